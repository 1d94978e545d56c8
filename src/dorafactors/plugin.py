"""Install dorafactors' DoRA into an unmodified upstream PEFT.

``peft.tuners.lora.variants`` binds PEFT's DoRA layer classes at import time and its LoRA layers
look the ``Dora*Variant`` classes up there at call time. Replacing those attributes is the seam:
models whose DoRA adapters are created after :func:`enable` use our classes; :func:`disable`
restores PEFT's own. Patching ``peft.tuners.lora.dora`` alone would change nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from packaging.version import Version

__all__ = ["SUPPORTED_PEFT", "enable", "disable", "is_enabled", "enabled"]

SUPPORTED_PEFT = (Version("0.18.0"), Version("0.22.0"))
"""Supported PEFT versions: ``0.18.0 <= version < 0.22.0`` (tested on 0.18.0 and 0.21.2)."""

_NAMES = (
    "DoraLinearLayer",
    "DoraEmbeddingLayer",
    "DoraConv1dLayer",
    "DoraConv2dLayer",
    "DoraConv3dLayer",
    "DoraLinearVariant",
    "DoraEmbeddingVariant",
    "DoraConv1dVariant",
    "DoraConv2dVariant",
    "DoraConv3dVariant",
)

_lock = threading.RLock()
_saved: dict[str, object] = {}


def _check_peft_version() -> None:
    import peft

    version = Version(peft.__version__)
    low, high = SUPPORTED_PEFT
    if not (low <= version < high):
        raise RuntimeError(
            f"dorafactors supports peft >= {low} and < {high}; the installed peft is {peft.__version__}. "
            f"Install a supported release, e.g. `pip install 'peft>={low},<{high}'`."
        )


def _ours() -> dict[str, object]:
    from . import dora, dora_variants

    return {name: getattr(dora_variants if name.endswith("Variant") else dora, name) for name in _NAMES}


def enable() -> None:
    """Make ``LoraConfig(use_dora=True)`` use dorafactors for adapters created from now on.

    Raises:
        RuntimeError: if the installed PEFT is outside :data:`SUPPORTED_PEFT`.
    """
    with _lock:
        _check_peft_version()
        from peft.tuners.lora import variants

        if _saved:
            return
        for name, cls in _ours().items():
            _saved[name] = getattr(variants, name)
            setattr(variants, name, cls)


def disable() -> None:
    """Restore PEFT's own DoRA classes (adapters already created keep the classes they were built with)."""
    with _lock:
        if not _saved:
            return
        from peft.tuners.lora import variants

        for name, cls in _saved.items():
            setattr(variants, name, cls)
        _saved.clear()


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect (PEFT's variants module holds our classes)."""
    return bool(_saved)


@contextlib.contextmanager
def enabled(flag: bool = True) -> Iterator[None]:
    """Context manager: ``with dorafactors.enabled(): model = get_peft_model(...)``.

    ``enabled(False)`` scopes PEFT's own classes instead; the previous state is restored on exit.

    Example:
        >>> import dorafactors
        >>> from peft.tuners.lora import variants
        >>> with dorafactors.enabled():
        ...     variants.DoraLinearLayer.__module__
        'dorafactors.dora'
        >>> dorafactors.is_enabled()
        False
    """
    with _lock:
        was = is_enabled()
        (enable if flag else disable)()
    try:
        yield
    finally:
        with _lock:
            (enable if was else disable)()
