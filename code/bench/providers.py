"""The implementations compared side by side, and how each one is switched on.

Every provider is a context (``provider.active()``) held while its PEFT model is built *and* while
it runs, so class swaps through the seam (attributes of ``peft.tuners.lora.variants``) and
``dorafactors.config_override`` settings are in force at both times.

=================  ===================================================================================
``base``           the frozen base model, no adapter
``lora``           plain PEFT LoRA at the same rank (the floor)
``peft_ref``       upstream PEFT 0.18.0's DoRA: the SHA-1-checked reference file, its layer classes
                   swapped into ``peft.tuners.lora.variants`` (the installed variant classes are kept)
``peft_installed`` the installed PEFT's own DoRA (skipped when its dora.py is the reference itself)
``peft_cache``     the installed PEFT's DoRA under ``peft.helpers.DoraCaching`` (peft >= 0.19; the
                   cache works in eval only, so this provider runs inference phases only)
``ours_eager``     dorafactors, ``config_override(fused=False)``
``ours_fused``     dorafactors, ``config_override(fused=True)`` (needs CUDA and ``dora_fused``)
``ours_auto``      dorafactors in automatic dispatch: what users get
=================  ===================================================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import ContextManager, Optional

import torch

__all__ = ["PROVIDER_NAMES", "DORA_KINDS", "Provider", "make_providers", "reference_first", "reference_shims",
           "wrap_model"]

PROVIDER_NAMES = (
    "base",
    "lora",
    "peft_ref",
    "peft_installed",
    "peft_cache",
    "ours_eager",
    "ours_fused",
    "ours_auto",
)
REFERENCE_PROVIDER = "peft_ref"
FLOOR_PROVIDER = "lora"
DORA_KINDS = ("dora",)

_LAYER_NAMES = ("DoraLinearLayer", "DoraEmbeddingLayer", "DoraConv1dLayer", "DoraConv2dLayer", "DoraConv3dLayer")


@dataclasses.dataclass
class Provider:
    name: str
    label: str
    kind: str  # "base" | "lora" | "dora"
    available: bool
    reason: Optional[str] = None
    inference_only: bool = False
    _activate: Callable[[], ContextManager] = contextlib.nullcontext

    def active(self) -> ContextManager:
        """Context to hold while building and running this provider's model."""
        return self._activate()

    @property
    def is_dora(self) -> bool:
        return self.kind == "dora"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "label": self.label,
            "kind": self.kind,
            "available": self.available,
            "reason": self.reason,
            "inference_only": self.inference_only,
        }


# ---------------------------------------------------------------------------------------------
# the upstream reference, adapted to whatever PEFT is installed
# ---------------------------------------------------------------------------------------------


def reference_shims(ref: ModuleType) -> dict[str, type]:
    """Subclasses of the reference's layer classes that accept (and drop) the keywords newer PEFT
    releases pass (``adapter_name``); the arithmetic is the reference's own, untouched."""

    def shim(cls: type) -> type:
        def forward(self, *args, adapter_name=None, **kwargs):
            return cls.forward(self, *args, **kwargs)

        def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None):
            return cls.get_weight_norm(self, weight, lora_weight, scaling)

        def update_layer(self, *, adapter_name=None, **kwargs):
            return cls.update_layer(self, **kwargs)

        def _cache_clear(self):  # newer PEFT clears layer caches on train(); the reference has none
            return None

        body = {
            "forward": forward,
            "get_weight_norm": get_weight_norm,
            "update_layer": update_layer,
            "_cache_clear": _cache_clear,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        return type(cls.__name__, (cls,), body)

    return {name: shim(getattr(ref, name)) for name in _LAYER_NAMES if hasattr(ref, name)}


@contextlib.contextmanager
def _swap_layers(classes: dict[str, type]) -> Iterator[None]:
    from peft.tuners.lora import variants

    import dorafactors

    with dorafactors.enabled(False):
        saved = {name: getattr(variants, name) for name in classes}
        try:
            for name, cls in classes.items():
                setattr(variants, name, cls)
            yield
        finally:
            for name, cls in saved.items():
                setattr(variants, name, cls)


@contextlib.contextmanager
def _installed_peft(cache: bool = False) -> Iterator[None]:
    import dorafactors

    with dorafactors.enabled(False):
        if cache:
            from peft.helpers import DoraCaching

            with DoraCaching():
                yield
        else:
            yield


@contextlib.contextmanager
def _ours(**override) -> Iterator[None]:
    import dorafactors

    with dorafactors.enabled(True):
        if override:
            with dorafactors.config_override(**override):
                yield
        else:
            yield


def _installed_dora_sha1() -> Optional[str]:
    try:
        spec = importlib.util.find_spec("peft.tuners.lora.dora")
        if spec is None or spec.origin is None:
            return None
        return hashlib.sha1(Path(spec.origin).read_bytes()).hexdigest()
    except Exception:  # noqa: BLE001
        return None


def fused_module() -> tuple[Optional[ModuleType], Optional[str]]:
    """``dorafactors.dora_fused`` when it imports and reports itself available, else the reason."""
    try:
        module = importlib.import_module("dorafactors.dora_fused")
    except Exception as exc:  # noqa: BLE001 - any import failure makes the provider unavailable
        return None, f"dorafactors.dora_fused does not import: {type(exc).__name__}: {exc}"
    check = getattr(module, "is_available", None)
    if callable(check):
        try:
            if not check():
                return None, "dorafactors.dora_fused.is_available() is False (Triton or CUDA missing)"
        except Exception as exc:  # noqa: BLE001
            return None, f"dorafactors.dora_fused.is_available() raised {type(exc).__name__}: {exc}"
    return module, None


def make_providers(
    device: torch.device,
    *,
    reference: Optional[ModuleType],
    reference_reason: Optional[str],
    reference_sha1: str,
    selected: Optional[list[str]] = None,
) -> list[Provider]:
    """All providers in their fixed order, each marked available or not (with the reason); those not
    in ``selected`` are dropped."""
    import peft

    peft_version = peft.__version__
    providers: list[Provider] = [
        Provider("base", "frozen base, no adapter", "base", True, _activate=_installed_peft),
        Provider("lora", f"PEFT {peft_version} LoRA (floor)", "lora", True, _activate=_installed_peft),
    ]
    if reference is not None:
        shims = reference_shims(reference)
        providers.append(
            Provider("peft_ref", "upstream PEFT 0.18.0 DoRA (reference file)", "dora", True,
                     _activate=lambda: _swap_layers(shims))
        )
    else:
        providers.append(Provider("peft_ref", "upstream PEFT 0.18.0 DoRA (reference file)", "dora", False,
                                  reference_reason or "reference not loaded"))

    installed_sha1 = _installed_dora_sha1()
    if installed_sha1 == reference_sha1:
        providers.append(Provider(
            "peft_installed", f"PEFT {peft_version} DoRA (installed)", "dora", False,
            f"installed peft {peft_version}'s dora.py is byte-identical to the reference (see peft_ref)"))
    else:
        providers.append(Provider("peft_installed", f"PEFT {peft_version} DoRA (installed)", "dora", True,
                                  _activate=_installed_peft))

    try:
        import peft.helpers as helpers

        has_cache = hasattr(helpers, "DoraCaching")
    except Exception:  # noqa: BLE001
        has_cache = False
    providers.append(Provider(
        "peft_cache", f"PEFT {peft_version} DoRA + DoraCaching", "dora", has_cache,
        None if has_cache else f"installed peft {peft_version} has no peft.helpers.DoraCaching (peft >= 0.19)",
        inference_only=True, _activate=lambda: _installed_peft(cache=True)))

    ours_reason = None
    try:
        from packaging.version import Version

        import dorafactors

        low, high = dorafactors.SUPPORTED_PEFT
        if not (low <= Version(peft_version) < high):
            ours_reason = f"dorafactors supports peft >= {low}, < {high}; installed {peft_version}"
    except Exception as exc:  # noqa: BLE001
        ours_reason = f"dorafactors does not import: {type(exc).__name__}: {exc}"
    providers.append(Provider("ours_eager", "dorafactors eager", "dora", ours_reason is None, ours_reason,
                              _activate=lambda: _ours(fused=False)))
    fused_reason = ours_reason
    if fused_reason is None and device.type != "cuda":
        fused_reason = "the fused path needs a CUDA device"
    if fused_reason is None:
        _module, fused_reason = fused_module()
    providers.append(Provider("ours_fused", "dorafactors fused (Triton)", "dora", fused_reason is None,
                              fused_reason, _activate=lambda: _ours(fused=True)))
    providers.append(Provider("ours_auto", "dorafactors auto dispatch", "dora", ours_reason is None, ours_reason,
                              _activate=_ours))
    if selected is not None:
        providers = [p for p in providers if p.name in selected]
    return providers


def reference_first(selected: list[Provider], every: list[Provider]) -> list[tuple[Provider, bool]]:
    """``(provider, check_only)`` pairs, the reference first: its outputs are what the others are
    checked against. When ``--providers`` leaves the reference out but it is available, it still
    runs, ``check_only``: it checks the others and records nothing."""
    ref = next((p for p in every if p.name == REFERENCE_PROVIDER), None)
    out: list[tuple[Provider, bool]] = []
    if ref is not None:
        if any(p.name == REFERENCE_PROVIDER for p in selected):
            out.append((ref, False))
        elif ref.available:
            out.append((ref, True))
    return out + [(p, False) for p in selected if p.name != REFERENCE_PROVIDER]


def wrap_model(provider: Provider, model: torch.nn.Module, *, r: int, target_modules: list[str],
               alpha: Optional[float] = None) -> torch.nn.Module:
    """The provider's adapted model: ``model`` itself (frozen) for ``base``, else PEFT's wrapper with
    ``LoraConfig(r, lora_alpha=alpha or r, use_dora=...)`` built under ``provider.active()``."""
    if provider.kind == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else r,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        use_dora=provider.is_dora,
        bias="none",
    )
    with provider.active():
        return get_peft_model(model, config)
