"""Engines run guest instructions and report exits; see hvm.engine.base for the interface."""

from __future__ import annotations

import inspect
from typing import Any

from hvm.engine.base import Engine
from hvm.errors import EngineUnavailable
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
    if name == "model":
        from hvm.engine.model import ModelEngine as cls
    elif name == "trap":
        from hvm.engine.trap import TrapEngine as cls
    else:
        from hvm.engine.kvm import KvmEngine as cls
    options = dict(options or {})
    accepted = inspect.signature(cls).parameters
    unknown = sorted(k for k in options if k not in accepted or k == "memory")
    if unknown:
        raise EngineUnavailable(f"the {name} engine has no option {', '.join(unknown)}")
    return cls(memory, **options)


__all__ = ["ENGINES", "Engine", "available_engines", "create_engine", "resolve_engine_name"]
