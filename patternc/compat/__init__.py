"""Other libraries' module trees built on patternc's attention core.

- :mod:`patternc.compat.noether`: the classes and configs of the peer package
  ``noether`` (emmiai-noether 2026.4.0) under its names and module paths,
  loading its checkpoints strictly and giving its numbers.
"""
