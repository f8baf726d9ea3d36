"""patternc: a declarative attention-pattern compiler for PyTorch.

Write which token groups attend to which in a pattern file, check it, and
hand the compiled plan to the torch runtime (``patternc.nn``)::

    import patternc
    program = patternc.compile('''
        groups surface_anchors surface_queries volume_anchors volume_queries
        pattern self_anchor {
            surface_* -> surface_anchors
            volume_*  -> volume_anchors
        }
    ''')
    plan = program.patterns["self_anchor"]
    plan.attention_patterns   # seed-style AttentionPattern list

Importing ``patternc`` never imports torch; ``patternc.nn`` does.
"""

from typing import Any

from patternc.checks import check_patterns
from patternc.compiler import compile  # noqa: A004 - the public name
from patternc.diagnostics import Diagnostic, PatternError
from patternc.lower.layout import Layout, Sizes
from patternc.plan import Plan, Program
from patternc.schemas import AttentionConfig, AttentionPattern, MixedAttentionConfig, TokenSpec
from patternc.stack_config import TransformerConfig, VisionTransformerConfig

__version__ = "0.1.0"


def show(compiled: Plan | Program, sizes: Sizes, *, block: int | None = None) -> Any:
    """The mask of a plan (or a program's patterns) at ``sizes`` as a
    matplotlib figure (see :func:`patternc.maskplot.show`; needs matplotlib)."""
    from patternc.maskplot import show as draw

    return draw(compiled, sizes, block=block)


__all__ = [
    "AttentionConfig",
    "AttentionPattern",
    "Diagnostic",
    "Layout",
    "MixedAttentionConfig",
    "PatternError",
    "Plan",
    "Program",
    "TokenSpec",
    "TransformerConfig",
    "VisionTransformerConfig",
    "__version__",
    "check_patterns",
    "compile",
    "show",
]
