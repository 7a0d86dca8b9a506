"""Which plugins a run directory needs, so that it stays usable when the installed plugins change.

A run's ``config.yaml`` holds the section of every plugin that was installed when it ran. When the
run starts, ``plugins.json`` beside it records each plugin: its package (from its entry point), its
config sections, and whether the run enabled it (named in ``plugins:``, or one of its sections is
on: ``enabled: true``, or, for a section without an ``enabled`` field, set to anything but its
defaults). ``eval``, ``export`` and ``serve`` read the run's config with :func:`read_run_config`:

* the section of a plugin that is not installed now and that the run did not enable is dropped,
  with a one-line note on stderr;
* a plugin that the run enabled and that is not installed now is a one-line error naming it and
  its package.

A run without ``plugins.json`` (made before it existed) is read the same way, with the section's
name as its plugin's name and its ``enabled: true`` as the sign that the run used it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from metareason import durable
from metareason.errors import UserError

RECORD = "plugins.json"


def _section_on(section: Any) -> bool:
    if "enabled" in type(section).model_fields:
        return bool(section.enabled)
    try:
        return section.model_dump() != type(section)().model_dump()
    except Exception:  # a section model without defaults: it was filled in on purpose
        return True


def plugin_record(kernel) -> dict[str, dict]:
    """``{plugin: {package, version, sections, enabled}}`` of the plugins loaded for ``kernel``."""
    from metareason.plugin_manager import ALWAYS_ENABLED, OWN_DISTRIBUTION

    pm, config = kernel.pm, kernel.config
    sections: dict[str, list[str]] = {}
    for plugin_name, got in kernel.call_each("metareason_config_sections"):
        sections.setdefault(plugin_name, []).extend(sorted(got or {}))
    listed = set(config.plugins or []) | set(ALWAYS_ENABLED)
    out = {}
    for name, info in sorted(pm.infos.items()):
        package = {"built-in": OWN_DISTRIBUTION, "registered": None}.get(info.source, info.source)
        own = sections.get(name, [])
        enabled = name in listed or any(_section_on(getattr(config, s)) for s in own if hasattr(config, s))
        out[name] = {"package": package, "version": info.version, "sections": own, "enabled": bool(enabled)}
    return out


def write_record(run_dir: Path, kernel) -> None:
    data = {"plugins": plugin_record(kernel)}
    durable.write_text_atomic(Path(run_dir) / RECORD, json.dumps(data, indent=2) + "\n")


def _read_record(run_dir: Path) -> dict[str, dict]:
    try:
        data = json.loads((run_dir / RECORD).read_text(encoding="utf-8"))
        plugins = data["plugins"]
        return {str(k): v for k, v in plugins.items() if isinstance(v, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def read_run_config(run_dir: Path, config_file: Path, note: bool = True) -> dict:
    """The run's ``config.yaml`` as a dict that validates with the plugins installed now (see the
    module's docstring); raises :class:`UserError` for a missing plugin the run enabled."""
    from metareason.config import ConfigError, KernelConfig, read_yaml, resolve_plugins
    from metareason.plugin_manager import PluginError, build_plugin_manager, discover

    raw = read_yaml(config_file)
    record = _read_record(Path(run_dir))
    installed = {ep.name for ep in discover()}

    def missing(name: str) -> UserError:
        package = (record.get(name) or {}).get("package") or name
        return UserError(f"{config_file}: the run enabled plugin '{name}' (package {package}), which is not "
                         f"installed: pip install {package}")

    listed = raw.get("plugins")
    for name in listed if isinstance(listed, list) else []:
        if isinstance(name, str) and name not in installed:
            raise missing(name)
    unknown = [k for k in raw if k not in KernelConfig.model_fields]
    if not unknown:
        return raw
    try:
        pm = build_plugin_manager(resolve_plugins(raw))
    except PluginError as exc:
        raise ConfigError(f"{config_file}: {exc}") from None
    provided = {s for got in pm.hook.metareason_config_sections() for s in (got or {})}
    owners = {s: name for name, info in record.items() for s in info.get("sections") or []}
    for key in unknown:
        owner = owners.get(key, key)
        if key in provided or owner in installed:
            continue  # validated as usual
        info: Optional[dict] = record.get(owner)
        section = raw[key]
        enabled = info.get("enabled") if info is not None else isinstance(section, dict) and section.get("enabled") is True
        if enabled:
            raise missing(owner)
        del raw[key]
        if note:
            print(f"[metareason] {config_file}: ignoring section '{key}' of plugin '{owner}' (not installed now; "
                  f"the run did not enable it)", file=sys.stderr)
    return raw
