"""Building a named generator from the run config's ``generators:`` section.

Backend types come from ``metareason_register_generator_backends``: ``register(type, ConfigModel,
factory)`` where ``ConfigModel`` is a pydantic model of the entry's fields (``type`` included)
and ``factory(config, name) -> Generator``. The kernel's own plugin registers ``local``,
``openai`` and ``python`` the same way.
"""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from metareason.config import ConfigError, format_validation_error


def build_generator(kernel: Any, name: str):
    entries = kernel.config.generators
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none configured"
        raise ConfigError(f"{kernel.source}: generators: no generator named {name!r} ({known})")
    spec = entries[name]
    registry = kernel.registries["generator"]
    if spec.type not in registry.names():
        raise ConfigError(f"{kernel.source}: generators.{name}.type: unknown backend {spec.type!r} "
                          f"(available: {', '.join(sorted(registry.names()))})")
    config_model, factory = registry.get(spec.type)
    try:
        cfg = config_model.model_validate(spec.model_dump())
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, kernel.source, prefix=f"generators.{name}")) from None
    return factory(cfg, name)
