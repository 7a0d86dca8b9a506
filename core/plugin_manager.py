"""Plugin discovery and the plugin manager.

Built-in and third-party plugins are found the same way: entry points of the group
``metareason``. Which are enabled comes from the run config's ``plugins:`` list or, for the
CLI, the ``METAREASON_PLUGINS`` environment variable (comma list); ``builtin`` (the kernel's
own tasks, rewards and architectures) is always on.
"""
from __future__ import annotations

import functools
import importlib.metadata as md
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import pluggy

from metareason import hookspecs

ENTRY_POINT_GROUP = "metareason"
ALWAYS_ENABLED = ("builtin",)
OWN_DISTRIBUTION = "metareason"


class PluginError(RuntimeError):
    """A plugin failed inside a hook, or plugin selection is wrong."""

    def __init__(self, message: str, plugin: Optional[str] = None, hook: Optional[str] = None):
        super().__init__(message)
        self.plugin = plugin
        self.hook = hook


@dataclass
class PluginInfo:
    name: str
    version: str
    source: str  # "built-in", a distribution name, or "registered" (programmatic)
    module: str
    hooks: list[str] = field(default_factory=list)


class MetareasonPluginManager(pluggy.PluginManager):
    """A pluggy manager whose hook implementations raise errors naming plugin and hook."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}

    def register(self, plugin: Any, name: Optional[str] = None) -> Optional[str]:  # type: ignore[override]
        plugin_name = super().register(plugin, name)
        if plugin_name is None:
            return None
        for caller in self.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper):
                    impl.function = _named_errors(impl.function, plugin_name, caller.name)
        if plugin_name not in self.infos:
            self.infos[plugin_name] = PluginInfo(
                name=plugin_name, version="-", source="registered", module=_module_name(plugin)
            )
        self.infos[plugin_name].hooks = sorted(c.name for c in self.get_hookcallers(plugin) or [])
        return plugin_name


def _module_name(plugin: Any) -> str:
    if inspect.ismodule(plugin):
        return plugin.__name__
    return f"{type(plugin).__module__}.{type(plugin).__qualname__}"


def _named_errors(fn, plugin_name: str, hook_name: str):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PluginError:
            raise
        except Exception as exc:  # re-raised with who failed where; the cause is kept
            raise PluginError(
                f"plugin '{plugin_name}' failed in hook '{hook_name}': {type(exc).__name__}: {exc}",
                plugin=plugin_name,
                hook=hook_name,
            ) from exc

    return wrapped


_loading_entry_points = False


def loading_entry_points() -> bool:
    """True while the kernel imports plugin entry-point modules.

    A plugin package whose import does heavy work for users (e.g. registering a model class with
    transformers' Auto classes) can skip it then: plugin discovery runs on every CLI call and must
    stay cheap, and the kernel does such work through hooks when a run needs it.
    """
    return _loading_entry_points


def discover() -> list[md.EntryPoint]:
    """All entry points of the ``metareason`` group, one per name (first wins)."""
    seen: dict[str, md.EntryPoint] = {}
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        seen.setdefault(ep.name, ep)
    return sorted(seen.values(), key=lambda e: (e.name not in ALWAYS_ENABLED, e.name))


def enabled_from_env() -> Optional[list[str]]:
    raw = os.environ.get("METAREASON_PLUGINS")
    if raw is None or not raw.strip():
        return None
    return [p.strip() for p in raw.split(",") if p.strip()]


def build_plugin_manager(enabled: Optional[Iterable[str]] = None) -> MetareasonPluginManager:
    """Load the plugins named in ``enabled`` (all discovered ones when ``None``).

    An unknown name is a ``PluginError`` listing the available ones.
    """
    pm = MetareasonPluginManager()
    available = discover()
    names = [ep.name for ep in available]
    wanted = None if enabled is None else list(dict.fromkeys(enabled))
    if wanted is not None:
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise PluginError(
                f"plugins: unknown plugin {unknown[0]!r} (installed: {', '.join(names) or 'none'})"
            )
    for ep in available:
        if wanted is not None and ep.name not in wanted and ep.name not in ALWAYS_ENABLED:
            continue
        global _loading_entry_points
        _loading_entry_points = True
        try:
            obj = ep.load()
        except Exception as exc:
            raise PluginError(
                f"plugin '{ep.name}' could not be imported ({ep.value}): {type(exc).__name__}: {exc}",
                plugin=ep.name,
            ) from exc
        finally:
            _loading_entry_points = False
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        source = "built-in" if dist_name == OWN_DISTRIBUTION else dist_name
        pm.infos[ep.name] = PluginInfo(ep.name, version, source, ep.value)
        pm.register(obj, name=ep.name)
    return pm
