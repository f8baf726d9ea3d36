"""The peer's module configs (``noether.core.schemas.modules``): every name
each submodule exports (its ``__all__``), so a config is listed once, where it
is defined."""

from patternc.compat.noether.core.schemas.modules import attention, blocks, layers, mlp, untied
from patternc.compat.noether.core.schemas.modules.attention import *  # noqa: F403
from patternc.compat.noether.core.schemas.modules.blocks import *  # noqa: F403
from patternc.compat.noether.core.schemas.modules.layers import *  # noqa: F403
from patternc.compat.noether.core.schemas.modules.mlp import *  # noqa: F403
from patternc.compat.noether.core.schemas.modules.untied import *  # noqa: F403

# the forms type checkers read as re-exports (``__all__ += module.__all__``)
__all__: list[str] = []
__all__ += attention.__all__
__all__ += blocks.__all__
__all__ += layers.__all__
__all__ += mlp.__all__
__all__ += untied.__all__
