"""Named plug-ins: one :class:`Registry` idiom for losses, verifiers, rollout engines, advantage estimators and
solution keys.

An entry registers itself where it is defined (``@register_loss("simko")`` on its class, ``@register_verifier
("countdown")``, ...), and a registry finds its entries by one rule: it scans its package. On the first lookup
(``get``, ``build``, ``names``, ``in``, iteration) it imports every module of the package, so a new entry is one new
file there and no list to extend. A lazy registry (the rollout engines, whose modules import heavy optional packages
such as vLLM) imports only the module named like the entry asked for, and lists the package's module names as
its names without importing them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_MISSING: Any = object()


class Registry(Generic[T]):
    """Entries of one kind by name.

    Args:
        kind: what the entries are, for messages (``"loss"``, ``"rollout engine"``).
        packages: the packages whose modules register entries (none: entries are registered where the registry
            is defined).
        lazy: import only ``<package>.<name>`` when ``name`` is asked for (its module's name is its entry's
            name); ``names()`` then lists the package's modules (but ``skip``) without importing them.
        skip: module names of the package that hold no entry (lazy registries).
        config_key: the config key that names an entry (``"rollout.engine"``), quoted in the unknown-name error.
        prepare: ``prepare(obj, **options) -> entry``: what is stored for a registered object (checks and
            wrapping; default: the object itself).
    """

    def __init__(
        self,
        kind: str,
        packages: tuple[str, ...] = (),
        *,
        lazy: bool = False,
        skip: tuple[str, ...] = (),
        config_key: str | None = None,
        prepare: Callable[..., T] | None = None,
    ):
        if lazy and len(packages) != 1:
            raise ValueError("a lazy registry scans exactly one package")
        self.kind = kind
        self.packages = tuple(packages)
        self.lazy = lazy
        self.skip = tuple(skip)
        self.config_key = config_key
        self._prepare = prepare
        self._entries: dict[str, T] = {}
        self._discovered = not packages

    # ------------------------------------------------------------------ registering
    def register(self, name: str, **options) -> Callable[[Any], Any]:
        """``@registry.register("name")`` (or ``registry.register("name")(obj)``): store ``obj`` under ``name``;
        a class gets ``cls.name = name``. Returns ``obj`` unchanged; a name registered twice raises."""

        def deco(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            entry = self._prepare(obj, **options) if self._prepare is not None else obj
            if isinstance(obj, type):
                obj.name = name
            self._entries[name] = entry
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register throw-away entries)."""
        del self._entries[name]

    # ------------------------------------------------------------------ looking up
    def discover(self, name: str | None = None) -> None:
        """Import the modules that register entries: every module of the packages (once), or, for a lazy
        registry, the module ``name`` when it is one of the package's and not registered yet."""
        if self.lazy:
            if name is not None and name not in self._entries and name in self._module_names():
                importlib.import_module(f"{self.packages[0]}.{name}")
            return
        if self._discovered:
            return
        self._discovered = True  # before importing: the modules register into this registry while they load
        try:
            for package in self.packages:
                for module in self._module_names(package):
                    importlib.import_module(f"{package}.{module}")
        except BaseException:
            self._discovered = False  # a module that fails to import fails every lookup, not only the first
            raise

    def get(self, name: str, default: Any = _MISSING) -> T:
        """The entry ``name``; unknown: ``default`` when given, else a ValueError naming it and the known names."""
        self.discover(name)
        if name in self._entries:
            return self._entries[name]
        if default is not _MISSING:
            return default
        where = f" ({self.config_key})" if self.config_key else ""
        raise ValueError(f"unknown {self.kind} {name!r}{where}; available: {', '.join(self.names())}")

    def build(self, name: str, *args, **kwargs) -> Any:
        """``get(name)(*args, **kwargs)``: a new instance of a registered class (or a call of a function)."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        """The known names, sorted (a lazy registry: its package's modules too, imported or not)."""
        if self.lazy:
            return sorted(set(self._module_names()) | set(self._entries))
        self.discover()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

    def _module_names(self, package: str | None = None) -> list[str]:
        package = package or self.packages[0]
        path = importlib.import_module(package).__path__
        return [m.name for m in pkgutil.iter_modules(path) if m.name not in self.skip]
