"""Name -> object registries filled by plugins through ``metareason_register_*`` hooks."""
from __future__ import annotations

from typing import Any, Generic, Optional, TypeVar

from metareason.errors import UserError

T = TypeVar("T")


class RegistryError(UserError):
    pass


class Registry(Generic[T]):
    """Unique names; a name ending in ``/`` is a family prefix (``reasoning_gym/``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, tuple[T, str]] = {}

    def register(self, name: str, obj: T, plugin: str = "?") -> None:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"plugin '{plugin}' registered a {self.kind} with an empty name")
        if name in self._items:
            other = self._items[name][1]
            raise RegistryError(f"{self.kind} {name!r} is registered by both '{other}' and '{plugin}'")
        self._items[name] = (obj, plugin)

    def lookup(self, name: str) -> tuple[T, dict[str, Any]]:
        """``(obj, extra_params)``; a family match passes the suffix as ``{"name": suffix}``."""
        if name in self._items:
            return self._items[name][0], {}
        for key, (obj, _) in self._items.items():
            if key.endswith("/") and name.startswith(key) and len(name) > len(key):
                return obj, {"name": name[len(key):]}
        names = ", ".join(sorted(k + ("<name>" if k.endswith("/") else "") for k in self._items)) or "none"
        raise RegistryError(f"unknown {self.kind} {name!r} (available: {names})")

    def get(self, name: str) -> T:
        return self.lookup(name)[0]

    def owner(self, name: str) -> Optional[str]:
        item = self._items.get(name)
        return item[1] if item else None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        try:
            self.lookup(name)
        except RegistryError:
            return False
        return True
