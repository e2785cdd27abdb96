"""The registry of security backends: ``config.security`` -> the :class:`SecurityBackend` to use.

Adding a security level: subclass :class:`SecurityBackend` in a module of this package, add
an instance to :data:`BACKENDS` and its name to ``flower_split.config.SECURITY_LEVELS``
(docs/ARCHITECTURE.md walks through it).
"""

from __future__ import annotations

from flower_split.backends.base import SecurityBackend
from flower_split.backends.plain import PlainBackend
from flower_split.backends.secure import SecureBackend
from flower_split.config import SECURITY_LEVELS, ConfigError, RunConfig
from flower_split.flower.settings import FlowerSettings

BACKENDS: dict[str, SecurityBackend] = {backend.name: backend for backend in (PlainBackend(), SecureBackend())}
if tuple(BACKENDS) != SECURITY_LEVELS:
    raise ImportError(f"security backends {tuple(BACKENDS)} do not match config.SECURITY_LEVELS {SECURITY_LEVELS}")


def get_backend(name: str) -> SecurityBackend:
    """The backend registered under ``name`` (ConfigError naming the choices otherwise)."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"security: expected one of {tuple(BACKENDS)}, got {name!r}") from None


def backend_for(config: RunConfig, settings: FlowerSettings | None = None) -> SecurityBackend:
    """The backend of ``config.security``, after it checked the run (and its Flower settings)."""
    backend = get_backend(config.security)
    if settings is None:
        backend.validate(config)
    else:
        backend.validate_flower(config, settings)
    return backend


def compare_variants() -> dict[str, dict]:
    """Every split run a comparison can ask for, by name (``split-plain``, ``split-secure-he``, ...)."""
    return {name: values for backend in BACKENDS.values() for name, values in backend.variants().items()}


__all__ = ["BACKENDS", "SecurityBackend", "backend_for", "compare_variants", "get_backend"]
