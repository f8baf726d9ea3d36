"""RoPE in the peer's head-major layout (``noether.modeling.functional.rope``)."""

from __future__ import annotations

from torch import Tensor

from patternc.nn.rope import apply_rope

__all__ = ["rope"]


def rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate ``x`` (``[batch, heads, tokens, head_dim]``) by complex ``freqs``
    (``[batch, tokens, head_dim // 2]``), with patternc's :func:`~patternc.nn.apply_rope`.

    Raises:
        TypeError: ``freqs`` is not complex (the peer's legacy tuple of real
            frequencies is not supported: build them with ``implementation="complex"``).
    """
    if isinstance(freqs, tuple):
        raise TypeError(
            "real (tuple) RoPE frequencies are the peer's legacy form and are not supported here; "
            "build them with RopeFrequencyConfig(implementation='complex')"
        )
    return apply_rope(x.transpose(1, 2), freqs).transpose(1, 2)
