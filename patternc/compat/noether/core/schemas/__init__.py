"""The peer's pydantic configs (``noether.core.schemas``)."""
