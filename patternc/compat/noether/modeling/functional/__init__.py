"""The peer's functional helpers (``noether.modeling.functional``)."""
