"""``noether.modeling`` of the peer: its modules (:mod:`.modules`) and functions."""
