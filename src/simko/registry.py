"""Registries of classes by name (losses, rollout engines): one decorator factory for all of them."""

from __future__ import annotations

from collections.abc import Callable


def class_registrar(table: dict[str, type], kind: str) -> Callable[[str], Callable[[type], type]]:
    """``register = class_registrar(TABLE, "loss")``; ``@register("name")`` puts the class into ``TABLE`` under
    ``name`` and sets ``cls.name``; a name registered twice raises."""

    def register(name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            if name in table:
                raise ValueError(f"{kind} {name!r} registered twice")
            table[name] = cls
            cls.name = name
            return cls

        return deco

    return register
