"""Engines run guest instructions and report exits; see hvm.engine.base for the interface."""

from __future__ import annotations

import inspect
from typing import Any

from hvm.engine.base import Engine
from hvm.errors import EngineUnavailable
from hvm.params import typed_value
from hvm.vmm.memory import GuestMemory

ENGINES = ("kvm", "model", "trap")


def resolve_engine_name(name: str) -> str:
    """'auto' becomes the best engine this host can run."""
    from hvm.engine.kvm import kvm_usable

    if name == "auto":
        return "kvm" if kvm_usable() else "model"
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r} (choose from: auto, {', '.join(ENGINES)})")
    return name


def available_engines() -> list[str]:
    """The engines this host can run now."""
    from hvm.engine.kvm import kvm_usable

    return [name for name in ENGINES if name != "kvm" or kvm_usable()]


def create_engine(name: str, memory: GuestMemory, options: dict[str, Any] | None = None) -> Engine:
    """Build engine ``name``; ``options`` are its constructor's keyword arguments (engine-specific)."""
    name = resolve_engine_name(name)
    cls = _engine_class(name)
    options = dict(options or {})
    accepted = _options_of(cls)
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        known = ", ".join(accepted) or "none"
        raise EngineUnavailable(f"the {name} engine has no option {', '.join(unknown)} (it has: {known})")
    return cls(memory, **options)


def _engine_class(name: str) -> type[Engine]:
    name = resolve_engine_name(name)
    if name == "model":
        from hvm.engine.model import ModelEngine

        return ModelEngine
    if name == "trap":
        from hvm.engine.trap import TrapEngine

        return TrapEngine
    from hvm.engine.kvm import KvmEngine

    return KvmEngine


def _options_of(cls: type) -> dict[str, Any]:
    """An engine class's keyword options (beyond the guest memory) with their defaults."""
    return {p.name: p.default for p in inspect.signature(cls).parameters.values()
            if p.name != "memory" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def engine_options(name: str) -> dict[str, Any]:
    """The options of engine ``name`` a command line can give (string, number or flag), with defaults."""
    cls = _engine_class(name)
    params = inspect.signature(cls).parameters
    return {k: v for k, v in _options_of(cls).items()
            if isinstance(v, (str, int, float)) or (v is None and params[k].annotation == "str | None")}


def parse_engine_options(name: str, pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to engine options, each VALUE converted to its default's type."""
    accepted = engine_options(name)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in accepted:
            known = ", ".join(accepted) or "none"
            raise EngineUnavailable(f"--engine-option {pair!r}: expected KEY=VALUE, KEY one of: {known}")
        default = accepted[key]
        try:
            out[key] = typed_value(value, default)
        except ValueError:
            why = f"{value!r} is not of type {type(default).__name__}"
            raise EngineUnavailable(f"--engine-option {pair!r}: {why}") from None
    return out


__all__ = ["ENGINES", "Engine", "available_engines", "create_engine", "engine_options",
           "parse_engine_options", "resolve_engine_name"]
