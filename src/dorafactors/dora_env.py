"""The one place that reads dorafactors' environment variables.

Every variable is parsed into a frozen, validated :class:`DoraEnvConfig`; a bad
value raises ``ValueError`` naming the variable, the value and what is accepted.
``get_config()`` re-reads the environment only when one of the variables changed,
so the per-forward cost is a handful of dict look-ups. Tests and benchmarks build
configs from dicts (:meth:`DoraEnvConfig.from_mapping`) or use :func:`config_override`.

This module imports nothing but the standard library, so it is safe anywhere; through
hf.patch it ships as ``peft.tuners.lora.dora_env`` (PEFT already has a ``config`` module).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Optional

__all__ = [
    "ENV_VARS",
    "DoraEnvConfig",
    "config_override",
    "get_config",
]

# name -> (default shown in docs, accepted values, effect). README's table mirrors this.
ENV_VARS: dict[str, tuple[str, str, str]] = {
    "PEFT_DORA_FUSED": (
        "unset (auto)",
        "unset, 0, 1",
        "unset: Triton kernels when Triton is importable and tensors are on CUDA, eager otherwise; "
        "1: require the fused path (error where it cannot run); 0: always eager PyTorch",
    ),
    "PEFT_DORA_FUSED_BACKWARD": (
        "unset (auto)",
        "unset, 0, 1",
        "unset: fused backward except for small layers where it does not pay; 1: always; 0: never",
    ),
    "PEFT_DORA_NORM_CHUNK_MB": (
        "256",
        "integer >= 16",
        "bound (MiB) on the row chunk of W converted for the factored norm; no [d_out, d_in] temporary beyond it",
    ),
    "PEFT_DORA_FWD_CHUNK_MB": (
        "256",
        "integer >= 16",
        "bound (MiB) on eager compose temporaries for very wide outputs (inference, no autograd)",
    ),
    "PEFT_DORA_NORM_CACHE": (
        "1",
        "0, 1",
        "1: reuse the row norm while W, A, B and s are unchanged (eval, gradient accumulation, checkpoint "
        "recompute); 0: recompute every forward",
    ),
    "DORA_AUTOTUNE_COMPREHENSIVE": (
        "0",
        "0, 1",
        "1: search a large Triton autotune space (slow first call); 0: a small fast-compiling set",
    ),
    "PEFT_DORA_ALLOW_PARTIAL_GATHER": (
        "0",
        "0, 1",
        "1: under FSDP2 / ZeRO-3, never gather the base weight for the norm: each rank reduces its own shard "
        "(all-reduce of a [2, d_out] vector), A and B gathered whole; where the layout does not allow it, a "
        "warning and a whole gather",
    ),
    "PEFT_FORCE_GATHER": (
        "unset (detect)",
        "unset, 0, 1",
        "unset: gather a parameter the norm needs only when FSDP2 / ZeRO-3 has not materialized it; 1: gather "
        "every sharded parameter for each norm computation; 0: never gather (error naming this variable if "
        "one is not materialized)",
    ),
}

_MIN_CHUNK_MB = 16


def _parse_tristate(name: str, raw: Optional[str]) -> Optional[bool]:
    if raw is None or raw.strip() == "":
        return None
    value = raw.strip()
    if value == "1":
        return True
    if value == "0":
        return False
    raise ValueError(f"{name}={raw!r} is not valid; accepted values: unset, '0' or '1'")


def _parse_bool(name: str, raw: Optional[str], default: bool) -> bool:
    parsed = _parse_tristate(name, raw)
    return default if parsed is None else parsed


def _parse_chunk_mb(name: str, raw: Optional[str], default: int) -> int:
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not valid; accepted values: an integer >= {_MIN_CHUNK_MB} (MiB)") from None
    if value < _MIN_CHUNK_MB:
        raise ValueError(f"{name}={raw!r} is too small; accepted values: an integer >= {_MIN_CHUNK_MB} (MiB)")
    return value


@dataclasses.dataclass(frozen=True)
class DoraEnvConfig:
    """Validated settings. ``None`` in a tri-state field means "decide automatically"."""

    fused: Optional[bool] = None
    fused_backward: Optional[bool] = None
    norm_chunk_mb: int = 256
    fwd_chunk_mb: int = 256
    norm_cache: bool = True
    autotune_comprehensive: bool = False
    allow_partial_gather: bool = False
    force_gather: Optional[bool] = None

    def __post_init__(self) -> None:
        for field in ("norm_chunk_mb", "fwd_chunk_mb"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < _MIN_CHUNK_MB:
                raise ValueError(f"{field}={value!r} is not valid; accepted values: an integer >= {_MIN_CHUNK_MB}")
        for field in ("fused", "fused_backward", "force_gather"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{field}={value!r} is not valid; accepted values: None, True or False")
        for field in ("norm_cache", "autotune_comprehensive", "allow_partial_gather"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{field}={getattr(self, field)!r} is not valid; accepted values: True or False")

    @property
    def norm_chunk_bytes(self) -> int:
        return self.norm_chunk_mb * 1024 * 1024

    @property
    def fwd_chunk_bytes(self) -> int:
        return self.fwd_chunk_mb * 1024 * 1024

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> "DoraEnvConfig":
        """Parse the variables of :data:`ENV_VARS` from ``env`` (e.g. ``os.environ`` or a test dict)."""
        return cls(
            fused=_parse_tristate("PEFT_DORA_FUSED", env.get("PEFT_DORA_FUSED")),
            fused_backward=_parse_tristate("PEFT_DORA_FUSED_BACKWARD", env.get("PEFT_DORA_FUSED_BACKWARD")),
            norm_chunk_mb=_parse_chunk_mb("PEFT_DORA_NORM_CHUNK_MB", env.get("PEFT_DORA_NORM_CHUNK_MB"), 256),
            fwd_chunk_mb=_parse_chunk_mb("PEFT_DORA_FWD_CHUNK_MB", env.get("PEFT_DORA_FWD_CHUNK_MB"), 256),
            norm_cache=_parse_bool("PEFT_DORA_NORM_CACHE", env.get("PEFT_DORA_NORM_CACHE"), True),
            autotune_comprehensive=_parse_bool(
                "DORA_AUTOTUNE_COMPREHENSIVE", env.get("DORA_AUTOTUNE_COMPREHENSIVE"), False
            ),
            allow_partial_gather=_parse_bool(
                "PEFT_DORA_ALLOW_PARTIAL_GATHER", env.get("PEFT_DORA_ALLOW_PARTIAL_GATHER"), False
            ),
            force_gather=_parse_tristate("PEFT_FORCE_GATHER", env.get("PEFT_FORCE_GATHER")),
        )


_lock = threading.Lock()
_cached_key: Optional[tuple] = None
_cached_config: Optional[DoraEnvConfig] = None
_overrides: list[DoraEnvConfig] = []


_ENV_NAMES = tuple(ENV_VARS)
_ENV_NAMES_BYTES = tuple(os.fsencode(name) for name in ENV_VARS)


def _environ_key() -> tuple:
    """The raw values of our variables; called on every forward, so it avoids os.environ's
    per-lookup encode/decode where the platform's mapping allows (POSIX keeps bytes in ``_data``)."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict) and os.name == "posix":
        return tuple(map(data.get, _ENV_NAMES_BYTES))
    return tuple(map(os.environ.get, _ENV_NAMES))


def get_config() -> DoraEnvConfig:
    """The active configuration: the innermost :func:`config_override`, else the environment."""
    global _cached_key, _cached_config
    if _overrides:
        return _overrides[-1]
    key = _environ_key()
    if key != _cached_key:
        config = DoraEnvConfig.from_mapping(os.environ)
        with _lock:
            _cached_key, _cached_config = key, config
    return _cached_config  # type: ignore[return-value]


@contextlib.contextmanager
def config_override(**changes) -> Iterator[DoraEnvConfig]:
    """Temporarily replace fields of the active config, e.g. ``config_override(fused=False)``.

    Raises:
        ValueError, TypeError: a field value outside what the variable accepts.

    Example:
        >>> with config_override(norm_cache=False) as cfg:
        ...     get_config().norm_cache
        False
        >>> DoraEnvConfig.from_mapping({"PEFT_DORA_NORM_CHUNK_MB": "8"})
        Traceback (most recent call last):
        ...
        ValueError: PEFT_DORA_NORM_CHUNK_MB='8' is too small; accepted values: an integer >= 16 (MiB)
    """
    config = dataclasses.replace(get_config(), **changes)
    _overrides.append(config)
    try:
        yield config
    finally:
        _overrides.remove(config)
