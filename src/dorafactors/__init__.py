"""dorafactors: memory-efficient, fast DoRA for HF PEFT.

Quick start::

    import dorafactors
    dorafactors.enable()                      # LoraConfig(use_dora=True) now uses dorafactors
    model = get_peft_model(base_model, LoraConfig(r=384, use_dora=True, target_modules="all-linear"))
"""

from .dora_env import DoraEnvConfig, config_override, get_config
from .plugin import SUPPORTED_PEFT, disable, enable, enabled, is_enabled

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_PEFT",
    "DoraEnvConfig",
    "config_override",
    "disable",
    "enable",
    "enabled",
    "get_config",
    "invalidate_norm_cache",
    "is_enabled",
]


def invalidate_norm_cache(module=None) -> None:
    """Drop cached DoRA row norms (of ``module``'s layers, or all). See :func:`dorafactors.dora.invalidate_norm_cache`."""
    from .dora import invalidate_norm_cache as _invalidate

    _invalidate(module)
