"""``noether.core`` of the peer: the configs (:mod:`.schemas`) and types."""
