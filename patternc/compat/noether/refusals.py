"""What the peer refuses, refused the same way.

The peer raises ``NotImplementedError`` for options it does not offer (an
init mode a module does not know, a KV cache on ``UntiedMixedAttention``),
and code written against it may catch exactly that type. The compat modules
raise :class:`PeerRefusal`, a subclass, so such code keeps working while the
refusals stay one named, documented kind rather than unfinished code.
"""

from __future__ import annotations

__all__ = ["PeerRefusal"]


class PeerRefusal(NotImplementedError):
    """An option the peer (and so this compat layer) does not offer; the
    message says which. A ``NotImplementedError``, as the peer raises."""
