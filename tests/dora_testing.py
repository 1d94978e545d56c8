"""Test helpers: the target under test, the reference, one comparison helper, tolerances, builders."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = os.environ.get("DORAFACTORS_TARGET", "plugin")
if TARGET not in ("plugin", "patched"):
    raise ValueError(f"DORAFACTORS_TARGET={TARGET!r} is not valid; accepted values: 'plugin', 'patched'")


def ours():
    """Our DoRA layer module: ``dorafactors.dora`` or the patched ``peft.tuners.lora.dora``."""
    if TARGET == "patched":
        return importlib.import_module("peft.tuners.lora.dora")
    return importlib.import_module("dorafactors.dora")


def ours_env():
    if TARGET == "patched":
        return importlib.import_module("peft.tuners.lora.dora_env")
    return importlib.import_module("dorafactors.dora_env")


REFERENCE_SHA1 = "86def591d419957607e8d8c03cb2f0c12f32d21d"


def _reference_path() -> Path:
    """``DORAFACTORS_REFERENCE`` (a patched tree's docs/dora.reference_hf_peft.py), else vendor/."""
    explicit = os.environ.get("DORAFACTORS_REFERENCE")
    if explicit:
        path = Path(explicit)
        digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else None
        if digest != REFERENCE_SHA1:
            raise RuntimeError(f"DORAFACTORS_REFERENCE={explicit!r}: SHA-1 {digest}, expected {REFERENCE_SHA1}")
        return path
    sys.path.insert(0, str(REPO_ROOT / "code" / "scripts"))
    try:
        import fetch_reference
    finally:
        sys.path.pop(0)
    ok, message = fetch_reference.check_reference()
    if not ok:
        raise RuntimeError(message)
    return fetch_reference.REFERENCE_PATH


def load_reference():
    spec = importlib.util.spec_from_file_location("peft_reference_dora", _reference_path())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_LAYER_NAMES = ("DoraLinearLayer", "DoraEmbeddingLayer", "DoraConv1dLayer", "DoraConv2dLayer", "DoraConv3dLayer")
_VARIANT_LAYER = {n.replace("Layer", "Variant"): n for n in _LAYER_NAMES}
_VARIANT_NAMES = tuple(_VARIANT_LAYER)


@contextlib.contextmanager
def use_impl(impl: str):
    """Context in which ``get_peft_model(..., use_dora=True)`` builds ``impl``'s DoRA.

    ``impl``: ``"ours"`` or ``"reference"`` (PEFT 0.18.0's layer classes with the installed PEFT's
    variants; in the patched tree the variants are ours).
    """
    from peft.tuners.lora import variants

    if impl == "ours":
        if TARGET == "patched":
            yield
            return
        import dorafactors

        with dorafactors.enabled():
            yield
        return
    if impl != "reference":
        raise ValueError(f"impl={impl!r}; accepted: 'ours', 'reference'")
    if TARGET == "plugin" and _installed_peft_is_newer():
        # PEFT >= 0.19 passes adapter_name to its DoRA layers, which the 0.18.0 file does not take:
        # there "upstream" is the installed release's own DoRA
        import dorafactors

        with dorafactors.enabled(False):
            yield
        return
    ref = load_reference()
    saved = {name: getattr(variants, name) for name in _LAYER_NAMES}
    # in the patched tree the variants are ours and hold their layer class: point those at the reference
    our_variants = [getattr(variants, n) for n in _VARIANT_NAMES if hasattr(getattr(variants, n), "layer_cls")]
    saved_layer_cls = {v: v.__dict__.get("layer_cls") for v in our_variants}
    if TARGET == "plugin":
        import dorafactors

        dorafactors.disable()
    try:
        for name in _LAYER_NAMES:
            setattr(variants, name, getattr(ref, name))
        for v in our_variants:
            v.layer_cls = getattr(ref, _VARIANT_LAYER[v.__name__])
        yield
    finally:
        for name, cls in saved.items():
            setattr(variants, name, cls)
        for v, cls in saved_layer_cls.items():
            if cls is None:
                del v.layer_cls
            else:
                v.layer_cls = cls


def _installed_peft_is_newer() -> bool:
    import peft
    from packaging.version import Version

    return Version(peft.__version__) >= Version("0.19.0")


# ---------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


TOLS = {
    torch.float64: Tol(1e-12, 1e-10),
    torch.float32: Tol(1e-5, 1e-4),
    torch.bfloat16: Tol(3e-2, 3e-2),
    torch.float16: Tol(4e-3, 4e-3),
}

DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """``(max_abs, rel_rms)`` in fp64."""
    a, e = actual.detach().double(), expected.detach().double()
    diff = a - e
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    denom = e.pow(2).mean().sqrt().item() if e.numel() else 0.0
    rel_rms = diff.pow(2).mean().sqrt().item() / denom if denom > 0 else diff.abs().max().item() if diff.numel() else 0.0
    return max_abs, rel_rms


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "") -> None:
    """NaN check first, then elementwise |a − e| <= atol + rtol·|e|; reports max-abs, rel-RMS, first mismatches."""
    label = f"{name}: " if name else ""
    assert actual.shape == expected.shape, f"{label}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    bad_a, bad_e = ~torch.isfinite(a), ~torch.isfinite(e)
    assert not bad_a.any() or torch.equal(bad_a, bad_e), f"{label}non-finite values at {bad_a.nonzero()[:5].tolist()}"
    mism = (a - e).abs() > atol + rtol * e.abs()
    if mism.any():
        max_abs, rel_rms = errors(a, e)
        idx = mism.nonzero()[:5].tolist()
        raise AssertionError(
            f"{label}{int(mism.sum())}/{mism.numel()} elements differ (max_abs={max_abs:.3e}, rel_rms={rel_rms:.3e}, "
            f"atol={atol}, rtol={rtol}); first at {idx}: actual {[a[tuple(i)].item() for i in idx]} "
            f"expected {[e[tuple(i)].item() for i in idx]}"
        )


def rel_rms(actual: torch.Tensor, truth: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite values"
    return errors(actual, truth)[1]
