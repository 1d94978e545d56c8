"""Shared pieces of the suites: dtypes and tolerances, error metrics, the precision protocol and
deterministic adapter values (identical for every provider of a case)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from typing import Any, Optional

import torch

__all__ = [
    "DTYPES",
    "TOLERANCE",
    "Case",
    "autocast",
    "compare",
    "exact_row_norm",
    "lora_layers",
    "set_adapters",
]

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

TOLERANCE: dict[str, float] = {"bf16": 5e-2, "fp16": 1e-2, "fp32": 1e-4}
"""Relative-RMS tolerance of a provider's output and gradients against the reference's in the same
dtype. Two correct bf16 implementations differ by a few bf16 ulps (2^-8 ≈ 4e-3) per element."""


@dataclasses.dataclass
class Case:
    """One unit of work of a suite: ``run(case, ctx)`` measures every provider on it."""

    suite: str
    name: str
    params: dict[str, Any]
    dtype: str

    def sub(self, name: str) -> "Case":
        """The same case under another name: the phase its rows belong to (``fwd``, ``gradient``...)."""
        return dataclasses.replace(self, name=name)

    @property
    def label(self) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.suite}/{self.name} {shape} {self.dtype}"


def autocast(device: torch.device, dtype: str, enabled: bool):
    """The precision protocol: ``torch.autocast`` to the model dtype (bf16/fp16) unless disabled;
    fp32 runs without autocast."""
    if not enabled or dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


@torch.no_grad()
def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Errors of ``out`` against ``ref`` (computed in fp64): relative RMS, max-abs, cosine.

    Non-finite values in ``out`` give ``rel_rms = max_abs = inf`` and ``cosine = nan``.
    """
    a = out.detach().to(torch.float64).reshape(-1)
    b = ref.detach().to(torch.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"compare: shapes differ, {tuple(out.shape)} vs {tuple(ref.shape)}")
    if not bool(torch.isfinite(a).all()):
        return {"rel_rms": math.inf, "max_abs": math.inf, "cosine": math.nan, "finite": 0.0}
    diff = a - b
    ref_norm = float(b.norm())
    rel = float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())
    denom = float(a.norm()) * ref_norm
    cosine = float(a @ b) / denom if denom > 0 else (1.0 if float(diff.norm()) == 0 else 0.0)
    return {"rel_rms": rel, "max_abs": float(diff.abs().max()) if diff.numel() else 0.0, "cosine": cosine,
            "finite": 1.0}


def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """PEFT LoRA layers of ``model`` (modules with ``lora_A``/``lora_B`` dicts), sorted by name."""
    found = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "get_base_layer"):
            if isinstance(module.lora_A, torch.nn.ModuleDict) and len(module.lora_A):
                found.append((name, module))
    return sorted(found, key=lambda item: item[0])


@torch.no_grad()
def exact_row_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, chunk_rows: int = 2048) -> torch.Tensor:
    """``‖W_i + s·(B·A)_i‖`` [d_out] in fp64, over row chunks (the ground truth; no library code)."""
    d_out = W.shape[0]
    A64 = A.to(torch.float64)
    out = torch.empty(d_out, dtype=torch.float64, device=W.device)
    for start in range(0, d_out, chunk_rows):
        rows = W[start : start + chunk_rows].to(torch.float64)
        rows = rows + s * (B[start : start + chunk_rows].to(torch.float64) @ A64)
        out[start : start + chunk_rows] = rows.norm(dim=1)
    return out


def _generator(device: torch.device, seed: int, *parts: str) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32("/".join(parts).encode())) % (2**63))
    return gen


@torch.no_grad()
def set_adapters(model: torch.nn.Module, *, seed: int, rho: float, mag_noise: float,
                 adapter: str = "default") -> int:
    """Give every adapted layer the same deterministic adapter values, whatever the provider.

    ``A`` ~ U(-1/√d_in, 1/√d_in) (PEFT's kaiming init), ``B`` Gaussian rescaled so that
    ``‖s·B·A‖_F = rho·‖W‖_F``, and for DoRA layers ``m = n·(1 + mag_noise·ε)`` with ``n`` the exact
    fp64 row norm of ``W + s·B·A``: small ``rho`` and ``mag_noise`` put ``g = m/n`` in the
    near-unity regime. Values depend only on ``seed`` and the module name. Returns the number of
    layers set.
    """
    from peft.utils.integrations import dequantize_module_weight

    count = 0
    for name, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        A = layer.lora_A[adapter].weight
        B = layer.lora_B[adapter].weight
        s = float(layer.scaling[adapter])
        # a quantized base: its dequantized values (outside any timed region)
        W = dequantize_module_weight(layer.get_base_layer())
        if getattr(layer, "fan_in_fan_out", False):
            W = W.T
        device = A.device
        d_in = A.shape[1]
        bound = 1.0 / math.sqrt(d_in)
        A_new = torch.rand(A.shape, generator=_generator(device, seed, name, "A"), device=device,
                           dtype=torch.float32).mul_(2 * bound).sub_(bound)
        B_new = torch.randn(B.shape, generator=_generator(device, seed, name, "B"), device=device,
                            dtype=torch.float32)
        # ‖B·A‖_F² = Σ (BᵀB) ⊙ (A·Aᵀ): no [d_out, d_in] product
        ba_sq = float(((B_new.T.double() @ B_new.double()) * (A_new.double() @ A_new.T.double())).sum())
        w_norm = math.sqrt(sum(float(W[i : i + 2048].double().square().sum()) for i in range(0, W.shape[0], 2048)))
        if ba_sq > 0 and s != 0:
            B_new.mul_(rho * w_norm / (abs(s) * math.sqrt(ba_sq)))
        A.copy_(A_new.to(A.dtype))
        B.copy_(B_new.to(B.dtype))
        mags = getattr(layer, "lora_magnitude_vector", None)
        if mags is not None and adapter in mags:
            n = exact_row_norm(W, A, B, s)
            noise = torch.randn(n.shape, generator=_generator(device, seed, name, "m"), device=device,
                                dtype=torch.float64)
            m = mags[adapter].weight
            m.copy_((n * (1.0 + mag_noise * noise)).view(m.shape).to(m.dtype))
        count += 1
    return count


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def perturb_(params: list[torch.nn.Parameter], scale: float = 1e-4) -> None:
    """Change parameters in place as an optimizer step would (outside any timed region) and drop
    their gradients, so no provider can serve a norm computed for parameters that no longer hold."""
    for p in params:
        p.add_(torch.randn_like(p), alpha=scale)
        p.grad = None


def zero_grads(params: list[torch.nn.Parameter], extra: Optional[list[torch.Tensor]] = None) -> None:
    for p in params:
        p.grad = None
    for t in extra or []:
        t.grad = None
