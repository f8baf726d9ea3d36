"""Configs that refuse what they don't know.

A field a config does not have is refused with the closest field's name
("unknown field `layerscale`; did you mean `layer_scale`?") instead of being
dropped: a dropped option is a model that silently trains without it. The
peer's spellings with the same meaning are accepted as aliases (``_ALIASES``),
and literal options such as activations in any case (``"GELU"``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from patternc.diagnostics import suggest

__all__ = ["StrictConfig", "check_fields"]


def check_fields(
    cls: type[BaseModel],
    data: Any,
    aliases: dict[str, str],
    lowercase: tuple[str, ...],
    *,
    allow_unrelated: bool = False,
) -> Any:
    """``data`` with aliases renamed and ``lowercase`` fields lower-cased, or a
    ``ValueError`` naming each unknown field and its closest known one.
    ``allow_unrelated``: keep unknown fields that are close to no known one
    (the seed's ``AttentionConfig`` takes extra fields for other backends),
    refusing only likely typos."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for alias, name in aliases.items():
        if alias in out:
            if name in out:
                raise ValueError(f"`{alias}` and `{name}` are the same field; give one")
            out[name] = out.pop(alias)
    for name in lowercase:
        if isinstance(out.get(name), str):
            out[name] = out[name].lower()
    known = set(cls.model_fields)
    problems = []
    for key in out:
        if key in known:
            continue
        hint = suggest(key, sorted(known))
        if allow_unrelated and hint is None:
            continue
        problems.append(
            f"unknown field `{key}`; " + (hint or f"{cls.__name__} has {', '.join(sorted(known))}")
        )
    if problems:
        raise ValueError("; ".join(problems))
    return out


class StrictConfig(BaseModel):
    """Frozen, no unknown fields (with a "did you mean"), peer aliases."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    _ALIASES: ClassVar[dict[str, str]] = {}
    _LOWERCASE: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        return check_fields(cls, data, cls._ALIASES, cls._LOWERCASE)
