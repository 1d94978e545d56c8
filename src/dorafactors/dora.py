"""DoRA layers with a factored row norm, drop-in replacements for PEFT's own.

DoRA rescales each output row of the adapted weight (DESIGN.md):

    W' = m ⊙ (W + s·B·A) / n,        n_i = ‖W_i + s·(B·A)_i‖

and we never build ``B·A``. Row ``i`` of the squared norm splits into

    n_i² = ‖W_i‖² + 2s·Σ_j B_ij U_ij + s²·Σ_j (B G)_ij B_ij,   U = W·Aᵀ [d_out, r],  G = A·Aᵀ [r, r]

``U`` is computed over bounded row chunks of ``W`` (``PEFT_DORA_NORM_CHUNK_MB``), everything is
accumulated in fp32 (fp64 for fp64 inputs), tiny negative rounding is clamped before the sqrt and the
norm is clamped to :data:`DORA_NORM_EPS`, so a zero row gives a finite result. ``n`` is detached
(DoRA paper, section 4.3). With ``g = m / n`` the layer output is

    y = g ⊙ (W x + s·B A x) + bias = base + (g − 1) ⊙ base + g·s ⊙ lora

where ``g − 1`` is computed as ``(m − n) / n`` in fp32 so the near-unity regime keeps its bits in
bf16/fp16. The row norm is cached while ``W, A, B`` are unchanged (see :class:`_NormCache`).

This file is also shipped as ``peft.tuners.lora.dora`` by hf.patch: package-relative imports only
between our modules, absolute ``peft.`` imports for PEFT utilities.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft.utils.integrations import dequantize_module_weight, gather_params_ctx
from peft.utils.other import transpose

from .dora_distributed import is_managed as _is_managed
from .dora_distributed import sharded_row_norm as _sharded_row_norm
from .dora_env import get_config
from .dora_quant import QuantRows, quant_rows

__all__ = [
    "DORA_NORM_EPS",
    "DoraConv1dLayer",
    "DoraConv2dLayer",
    "DoraConv3dLayer",
    "DoraEmbeddingLayer",
    "DoraLinearLayer",
    "factored_row_norm",
    "dense_row_norm",
    "fused_unavailable_reason",
    "invalidate_norm_cache",
    "use_fused_compose",
]

DORA_NORM_EPS = 1e-6
"""Lower clamp of the row norm ``n``. A row whose adapted weight is exactly zero has no direction;
with ``n = eps`` its output is ``m / eps · 0 = 0`` instead of upstream's inf/NaN (peft issue 2049)."""


# ---------------------------------------------------------------------------------------------
# Factored row norm
# ---------------------------------------------------------------------------------------------


def _accum_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _gemm_dtype(weight: torch.Tensor, *others: torch.Tensor) -> torch.dtype:
    """The norm's GEMMs run in the working dtype of the frozen weight (tensor cores for bf16/fp16,
    fp32 accumulation inside the GEMM); full-precision weights promote with the adapters."""
    if weight.dtype in (torch.bfloat16, torch.float16):
        return weight.dtype
    dtype = weight.dtype
    for t in others:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _rows_per_chunk(d_in: int, chunk_bytes: int) -> int:
    # worst case a chunk is converted to fp64 (8 bytes/element); everything else is [rows, r]
    return max(1, chunk_bytes // max(1, 8 * d_in))


def base_row_sq(weight: torch.Tensor, chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """``‖W_i‖²`` for ``weight`` [d_out, d_in] in fp32 (fp64 for fp64), over bounded row chunks."""
    chunk_bytes = chunk_bytes or get_config().norm_chunk_bytes
    acc = _accum_dtype(weight)
    d_out, d_in = weight.shape
    out = torch.empty(d_out, dtype=acc, device=weight.device)
    step = _rows_per_chunk(d_in, chunk_bytes)
    for start in range(0, d_out, step):
        rows = weight[start : start + step]
        out[start : start + step] = torch.linalg.vector_norm(rows, dim=1, dtype=acc).square()
    return out


def _norm_kernel_applies(weight: torch.Tensor, gemm_dtype: torch.dtype) -> bool:
    """The fused norm assembly runs on CUDA tensors when the fused path is allowed."""
    if weight.device.type != "cuda" or gemm_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if get_config().fused is False:
        return False
    fused = _fused_module()
    return fused is not None and fused.is_available()


def _autocast_off(device: torch.device):
    """The norm is computed in the precisions we choose, never autocast's."""
    if device.type in ("cuda", "cpu", "xpu", "mps", "hpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


@torch.no_grad()
def factored_row_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    base_sq: Optional[torch.Tensor] = None,
    chunk_bytes: Optional[int] = None,
    eps: float = DORA_NORM_EPS,
) -> torch.Tensor:
    """Row norms ``n`` [d_out] of ``W + s·B·A`` without forming ``B·A``.

    Args:
        weight: ``W`` [d_out, d_in] (any float dtype, may be a strided view).
        lora_A: ``A`` [r, d_in].
        lora_B: ``B`` [d_out, r].
        scaling: ``s``.
        base_sq: optional cached ``‖W_i‖²`` [d_out] (fp32).
        chunk_bytes: bound on any temporary derived from ``W``; defaults to ``PEFT_DORA_NORM_CHUNK_MB``.

    Returns:
        ``n`` [d_out], fp32 (fp64 if any input is fp64), detached, clamped to ``eps``.

    Raises:
        ValueError: if the shapes are not ``W [d_out, d_in]``, ``A [r, d_in]``, ``B [d_out, r]``.

    Example:
        >>> import torch
        >>> f64 = dict(dtype=torch.float64)
        >>> W, A, B = torch.randn(6, 5, **f64), torch.randn(2, 5, **f64), torch.randn(6, 2, **f64)
        >>> n = factored_row_norm(W, A, B, 0.5)
        >>> bool(torch.allclose(n, torch.linalg.norm(W + 0.5 * B @ A, dim=1)))
        True
    """
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            f"factored_row_norm expects W [d_out, d_in], A [r, d_in], B [d_out, r]; got W {tuple(weight.shape)}, "
            f"A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}"
        )
    d_out, d_in = weight.shape
    r = lora_A.shape[0]
    if lora_A.shape[1] != d_in or lora_B.shape != (d_out, r):
        raise ValueError(
            f"shape mismatch: W {tuple(weight.shape)} needs A [r, {d_in}] and B [{d_out}, r]; got A "
            f"{tuple(lora_A.shape)}, B {tuple(lora_B.shape)}"
        )
    chunk_bytes = chunk_bytes or get_config().norm_chunk_bytes
    acc = _accum_dtype(weight, lora_A, lora_B)
    device = weight.device
    if device.type == "meta" or lora_A.device.type == "meta" or lora_B.device.type == "meta":
        # low_cpu_mem_usage: shapes only, the real weights arrive later with load_state_dict
        return torch.empty(d_out, dtype=acc, device="meta")
    with _autocast_off(device):
        # under no_grad: no detach, and no cast where device and dtype fit (host ops after every step)
        gemm = _gemm_dtype(weight, lora_A)
        A_g = lora_A if lora_A.device == device and lora_A.dtype == gemm else lora_A.to(device=device, dtype=gemm)
        B = lora_B if lora_B.device == device and lora_B.dtype == acc else lora_B.to(device=device, dtype=acc)
        if base_sq is None:
            base_sq = base_row_sq(weight.detach(), chunk_bytes)
        step = _rows_per_chunk(d_in, chunk_bytes)
        A_gT = A_g.t()
        G = torch.mm(A_g, A_gT)  # [r, r]
        if eps > 0 and _norm_kernel_applies(weight, gemm):
            # U = W Aᵀ [d_out, r] (quantized W: row chunks); one Triton pass: terms, clamp, sqrt
            if isinstance(weight, torch.Tensor):
                U = torch.mm(weight, A_gT)  # a view of W in, [d_out, r] out: no W-sized temporary
            else:
                U = torch.empty(d_out, r, dtype=gemm, device=device)
                for start in range(0, d_out, step):
                    torch.matmul(weight[start : start + step].detach(), A_gT, out=U[start : start + step])
            from .dora_fused import norm_assembly_trusted

            n, _ = norm_assembly_trusted(base_sq, U, B, G, float(scaling), base_sq, eps)
            return n
        # cross term: Σ_j B_ij U_ij with U = W Aᵀ, one bounded row chunk of W at a time
        cross = torch.empty(d_out, dtype=acc, device=device)
        for start in range(0, d_out, step):
            U = weight[start : start + step].detach().to(gemm) @ A_g.T  # [rows, r]
            cross[start : start + step] = (U.to(acc) * B[start : start + step]).sum(dim=1)
        # Gram term: Σ_j (B G)_ij B_ij with G = A Aᵀ
        gram = ((B @ G.to(acc)) * B).sum(dim=1)
        n_sq = base_sq.to(acc) + (2.0 * scaling) * cross + (scaling * scaling) * gram
        return n_sq.clamp_min_(0).sqrt_().clamp_min_(eps)


@torch.no_grad()
def dense_row_norm(
    weight: torch.Tensor, delta: torch.Tensor, scaling: float, chunk_bytes: Optional[int] = None
) -> torch.Tensor:
    """Row norms of ``weight + scaling·delta`` (both [d_out, d_in]) over bounded row chunks, in fp32.

    Used where PEFT hands us a dense delta (merges); no full-size temporary is created.
    """
    chunk_bytes = chunk_bytes or get_config().norm_chunk_bytes
    acc = _accum_dtype(weight, delta)
    d_out, d_in = weight.shape
    out = torch.empty(d_out, dtype=acc, device=weight.device)
    if weight.device.type == "meta" or delta.device.type == "meta":
        return out
    step = _rows_per_chunk(d_in, chunk_bytes)
    for start in range(0, d_out, step):
        rows = weight[start : start + step].to(acc) + scaling * delta[start : start + step].to(acc)
        out[start : start + step] = torch.linalg.vector_norm(rows, dim=1)
    return out


# ---------------------------------------------------------------------------------------------
# Norm cache
# ---------------------------------------------------------------------------------------------

_global_epoch = 0


def _bump_epoch(*_args: Any, **_kwargs: Any) -> None:
    global _global_epoch
    _global_epoch += 1


def _install_optimizer_hook() -> None:
    # Writes through ``.data`` (DeepSpeed ZeRO-1/2 copying its fp32 master weights back) move no
    # version counter, so every optimizer step also invalidates every cache.
    try:
        from torch.optim.optimizer import register_optimizer_step_post_hook
    except ImportError:  # pragma: no cover - very old torch
        return
    register_optimizer_step_post_hook(_bump_epoch)


_install_optimizer_hook()


def invalidate_norm_cache(module: Optional[nn.Module] = None) -> None:
    """Drop cached DoRA row norms: of ``module``'s DoRA layers, or of every layer when ``None``.

    Call after editing adapter or base weights by hand outside an optimizer (e.g. through ``.data``).
    """
    if module is None:
        _bump_epoch()
        return
    for sub in module.modules():
        cache = getattr(sub, "_norm_cache", None)
        if isinstance(cache, _NormCache):
            cache.clear()


def _tensor_key(t: torch.Tensor) -> tuple:
    # views (A.T, reshapes) are new objects every call: key on the tensor that owns the storage
    owner = t._base if t._base is not None else t
    # the storage object, not its address: FSDP2 re-allocates an unsharded parameter's storage in place
    # on every all-gather (same object, new address, same values for a frozen W)
    storage = (t.untyped_storage()._cdata, t.storage_offset())
    return (id(owner), storage, t._version, t.dtype, t.device, tuple(t.shape), tuple(t.stride()))


class _NormCache:
    """Holds ``‖W_i‖²`` and ``n`` for one DoRA layer; never outlives the layer.

    A value is served only when the identity, storage, version counter, dtype, device, shape and
    stride of every input match, the scaling matches and no optimizer step happened since.
    """

    __slots__ = ("base_key", "base_sq", "norm_key", "norm", "generation", "__weakref__")

    def __init__(self) -> None:
        self.generation = 0
        self.clear()

    def clear(self) -> None:
        self.base_key = None
        self.base_sq = None
        self.norm_key = None
        self.norm = None
        self.generation += 1  # anything derived from an earlier norm is stale


# ---------------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------------


def _scale_shape(base: torch.Tensor, dim: int) -> list[int]:
    shape = [1] * base.dim()
    shape[dim] = -1
    return shape


def _g_terms(magnitude, norm, base, scaling):
    """``g − 1 = (m − n)/n`` and ``g·s`` in fp32 (fp64 for fp64 inputs), flat [d_out]."""
    acc = _accum_dtype(magnitude, norm, base)
    m = magnitude.reshape(-1).to(acc)
    n = norm.reshape(-1).to(acc)
    return (m - n) / n, m / n * scaling


def _tail_vectors(magnitude, norm, base, scaling):
    """``(g·s, s/n)``: what the fused linear tail's backward scales ∂B, ∂(A·x) and ∂m by."""
    from .dora_fused_linear import TailVectors  # the layer's own m and n: no validation

    return TailVectors(magnitude, norm, scaling)


class _GTermsCache:
    """Per-column vectors of one layer from ``m``, ``n`` (the cached norm tensor) and ``s``
    (``_g_terms``: ``(g − 1, g·s)``; ``_tail_vectors``), reused while those are unchanged:
    inference and micro-batches skip their small kernels on every forward."""

    __slots__ = ("key", "value", "fn")

    def __init__(self, fn=None) -> None:
        self.key = None
        self.value = None
        self.fn = fn or _g_terms

    def get(self, magnitude, norm, generation: int, base, scaling):
        # ``generation`` counts the norm cache's recomputes and clears (ids of freed tensors recur)
        key = (_tensor_key(magnitude), generation, base.dtype, float(scaling), _global_epoch)
        if key != self.key:
            # no graph: the compose's backward owns ∂m, and recording ops only on a cache miss would
            # make a checkpoint's recompute save a different number of tensors than its forward
            with torch.no_grad():
                self.value = self.fn(magnitude, norm, base, scaling)
            self.key = key
        return self.value


class _DoraDeltaEager(torch.autograd.Function):
    """``delta = (g − 1) ⊙ base + g·s ⊙ lora`` with DoRA's backward (n constant):

        ∂base = (g − 1) ⊙ dδ      ∂lora = g·s ⊙ dδ      ∂m_i = Σ_t dδ_ti · (base_ti + s·lora_ti) / n_i

    The magnitude gradient is reduced in fp32 whatever the activation dtype.
    """

    @staticmethod
    def forward(ctx, base, lora, magnitude, norm, scaling: float, dim: int, g_terms=None):
        g_minus_1, g_s = g_terms if g_terms is not None else _g_terms(magnitude, norm, base, scaling)
        shape = _scale_shape(base, dim)
        scale_base = g_minus_1.to(base.dtype).view(shape)
        scale_lora = g_s.to(lora.dtype).view(shape)
        delta = base * scale_base
        delta.add_(lora * scale_lora)
        ctx.save_for_backward(base, lora, norm, scale_base, scale_lora)
        ctx.scaling, ctx.dim, ctx.m_meta = scaling, dim, (magnitude.shape, magnitude.dtype)
        return delta

    @staticmethod
    def backward(ctx, d_delta):
        base, lora, norm, scale_base, scale_lora = ctx.saved_tensors
        d_base = d_lora = d_m = None
        if ctx.needs_input_grad[0]:
            d_base = d_delta * scale_base
        if ctx.needs_input_grad[1]:
            d_lora = d_delta * scale_lora
        if ctx.needs_input_grad[2]:
            acc = _accum_dtype(norm, base)
            v = base.to(acc) + ctx.scaling * lora.to(acc)
            dim = ctx.dim % base.dim()
            reduce_dims = [d for d in range(base.dim()) if d != dim]
            d_m = (d_delta.to(acc) * v).sum(dim=reduce_dims) / norm.reshape(-1).to(acc)
            d_m = d_m.reshape(ctx.m_meta[0]).to(ctx.m_meta[1])
        return d_base, d_lora, d_m, None, None, None, None


def _compose_delta_eager(
    base: torch.Tensor,
    lora: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
    dim: int,
    g_terms: Optional[tuple] = None,
) -> torch.Tensor:
    """``(g − 1) ⊙ base + g·s ⊙ lora`` in ``base.dtype``, with ``g − 1 = (m − n)/n`` in fp32.

    ``dim`` is the output-feature dimension (``-1`` for Linear/Embedding, ``1`` for Conv);
    ``g_terms`` optionally passes precomputed ``(g − 1, g·s)`` [d_out].
    """
    return _DoraDeltaEager.apply(base, lora, magnitude, norm.detach(), float(scaling), dim, g_terms)


@torch.no_grad()
def _compose_delta_chunked(base, lora, magnitude, norm, scaling, chunk_bytes, g_terms=None) -> torch.Tensor:
    """Inference-only eager compose over column blocks of a very wide output: bounded temporaries."""
    d_out = base.shape[-1]
    rows = max(1, base.numel() // max(1, d_out))
    cols = max(1, chunk_bytes // max(1, 4 * rows))
    if cols >= d_out:
        return _compose_delta_eager(base, lora, magnitude, norm, scaling, -1, g_terms)
    out = torch.empty_like(base)
    m, n = magnitude.reshape(-1), norm.reshape(-1)
    for start in range(0, d_out, cols):
        sl = slice(start, start + cols)
        out[..., sl] = _compose_delta_eager(base[..., sl], lora[..., sl], m[sl], n[sl], scaling, -1)
    return out


# ---------------------------------------------------------------------------------------------
# Dispatch between eager PyTorch and the fused Triton path
# ---------------------------------------------------------------------------------------------

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SMALL_BACKWARD_NUMEL = 1 << 16  # below this, launch overhead outweighs the fused backward's savings


_lazy_modules: dict = {}  # name -> module, or None where importing failed; tried once


def _lazy_module(name: str):
    """Sibling module ``name`` imported on first use (nothing needs Triton at import time), then
    served from a dict: a function-level import would cost a lookup per forward. ``None`` if it fails."""
    if name not in _lazy_modules:
        try:
            _lazy_modules[name] = importlib.import_module(f".{name}", __package__)
        except Exception:  # pragma: no cover - a broken Triton install
            _lazy_modules[name] = None
    return _lazy_modules[name]


def _fused_module():
    return _lazy_module("dora_fused")


def fused_unavailable_reason(result: torch.Tensor) -> Optional[str]:
    """Why the fused compose cannot run on ``result``'s device and dtype, or ``None`` if it can."""
    fused = _fused_module()
    if fused is None or not fused.is_available():
        return "Triton is not importable or no CUDA device is present"
    if result.device.type != "cuda" and not (get_config().fused and fused._interpreting()):
        # CPU tensors run the kernels only when forced under Triton's interpreter (tests)
        return f"tensors are on {result.device.type}, the kernels need CUDA"
    if result.dtype not in _FUSED_DTYPES:
        return f"dtype {result.dtype} is not one of float32, bfloat16, float16"
    return None


def use_fused_compose(result: torch.Tensor, needs_grad: bool) -> bool:
    """``PEFT_DORA_FUSED``: unset picks Triton where it can run, 1 requires it, 0 forbids it;
    ``PEFT_DORA_FUSED_BACKWARD`` decides for autograd-recording calls."""
    cfg = get_config()
    if cfg.fused is False:
        return False
    reason = fused_unavailable_reason(result)
    if reason is not None:
        if cfg.fused:
            raise RuntimeError(f"PEFT_DORA_FUSED=1 requires the fused DoRA path, but it cannot run: {reason}")
        return False
    if needs_grad:
        if cfg.fused_backward is None:
            return result.numel() >= _SMALL_BACKWARD_NUMEL or bool(cfg.fused)
        return cfg.fused_backward
    return True


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def _plain_lora_b_weight(lora_B: Any, ax: torch.Tensor) -> Optional[torch.Tensor]:
    """``lora_B``'s weight when ``lora_B`` is a plain bias-free ``nn.Linear`` the fused Function
    can stand in for (it multiplies in ``ax``'s dtype, as autocast's linear would); else None
    (also under ``torch.compile``, where the compose custom op keeps the graph whole)."""
    if type(lora_B) is not nn.Linear or lora_B.bias is not None or torch.compiler.is_compiling():
        return None
    B = lora_B.weight
    if B.dtype != ax.dtype:
        device_type = ax.device.type
        autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        if ax.dtype != autocast_dtype or not B.is_floating_point():
            return None  # lora_B(ax) decides what such a mix means (usually an error)
    return B


def _trains(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` requires grad (per forward: plain ``nn.Linear`` read directly)."""
    if type(module) is nn.Linear:
        return module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad)
    return any(p.requires_grad for p in module.parameters())


def _weight_of(module_or_tensor: Any) -> torch.Tensor:
    return module_or_tensor.weight if isinstance(module_or_tensor, nn.Module) else module_or_tensor


class DoraLinearLayer(nn.Module):
    """DoRA magnitude and composition for a ``Linear`` base layer (PEFT's contract).

    The magnitude ``m`` [d_out] lives in ``self.weight`` (what PEFT saves as ``lora_magnitude_vector``).
    """

    _fused_compose_supported = True  # the fused compose works on the last (feature) dimension

    def __init__(self, fan_in_fan_out: bool):
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        self._norm_cache = _NormCache()
        self._g_cache = _GTermsCache(_g_terms)
        self._tail_cache = _GTermsCache(_tail_vectors)

    # -- norms -------------------------------------------------------------------------------

    def _weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as ``W`` [d_out, d_in] (a view; no copy)."""
        return transpose(weight, self.fan_in_fan_out)

    def _factors(self, lora_A: Any, lora_B: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` [r, d_in] and ``B`` [d_out, r] from the modules or tensors PEFT passes."""
        return _weight_of(lora_A), _weight_of(lora_B)

    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name: Optional[str] = None) -> torch.Tensor:
        """Row norms of ``W + scaling·lora_weight`` for a dense ``lora_weight`` [d_out, d_in] (merge paths).

        Returns ``[d_out]`` in ``promote(weight, lora_weight)`` dtype, as upstream does.
        """
        W = self._weight_rows(weight)
        if W.shape != lora_weight.shape:
            raise ValueError(f"get_weight_norm: weight rows {tuple(W.shape)} != lora_weight {tuple(lora_weight.shape)}")
        out_dtype = torch.promote_types(W.dtype, lora_weight.dtype)
        return dense_row_norm(W, lora_weight, scaling).clamp_min(DORA_NORM_EPS).to(out_dtype)

    def row_norm(self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        """Factored ``n`` [d_out] (fp32, detached), reused while ``W, A, B, s`` are unchanged."""
        if _is_managed(weight, lora_A, lora_B):  # FSDP2 / ZeRO-3: see dora_distributed.py
            return _sharded_row_norm(self, weight, lora_A, lora_B, scaling, _global_epoch)
        W = self._weight_rows(weight)
        cfg = get_config()
        cache = self._norm_cache
        quantized = isinstance(W, QuantRows)
        if not cfg.norm_cache:
            cache.clear()
            # a quantized W fills ‖W_i‖² during the norm's own pass over its rows: one dequantization
            base_sq = W.row_sq if quantized else None
            return self._compute_norm(W, lora_A, lora_B, scaling, base_sq, cfg.norm_chunk_bytes)
        base_key = (W.cache_key() if quantized else _tensor_key(weight), self.fan_in_fan_out)
        if cache.base_key != base_key:
            # quantized: filled by the norm computed just below (a new base key always misses the norm key)
            cache.base_sq = W.row_sq if quantized else base_row_sq(W.detach(), cfg.norm_chunk_bytes)
            cache.base_key = base_key
        norm_key = (base_key, _tensor_key(lora_A), _tensor_key(lora_B), float(scaling), _global_epoch)
        if cache.norm_key != norm_key:
            try:
                cache.norm = self._compute_norm(W, lora_A, lora_B, scaling, cache.base_sq, cfg.norm_chunk_bytes)
            except BaseException:
                cache.clear()  # a quantized W's ‖W_i‖² is filled by this pass: never keep part of it
                raise
            cache.norm_key = norm_key
            cache.generation += 1
        return cache.norm

    def _compute_norm(self, W, A, B, scaling, base_sq, chunk_bytes, eps=DORA_NORM_EPS) -> torch.Tensor:
        return factored_row_norm(W, A, B, scaling, base_sq=base_sq, chunk_bytes=chunk_bytes, eps=eps)

    def update_layer(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False) -> None:
        """Initialise ``m`` to the row norm of ``W + s·B·A`` (``A``, ``B`` given as weight tensors)."""
        with gather_params_ctx(base_layer.parameters()):
            weight = quant_rows(base_layer)  # quantized: dequantized one row chunk at a time
            if weight is None:
                weight = dequantize_module_weight(base_layer).to(lora_A.device)
            mag_dtype = torch.promote_types(weight.dtype, lora_A.dtype)
            # the true norm (no eps clamp): m starts exactly where upstream's does
            norm = self._init_norm(weight, lora_A, lora_B, scaling)
        norm = norm.to(device=lora_A.device, dtype=mag_dtype)
        if place_on_cpu:
            norm = norm.to("cpu")
        self.weight = nn.Parameter(norm, requires_grad=True)
        self._norm_cache.clear()

    def _init_norm(self, weight, lora_A, lora_B, scaling) -> torch.Tensor:
        # update_layer receives A [r, d_in] and B [d_out, r] as tensors already; a quantized W fills
        # ‖W_i‖² during the norm's pass over its rows
        base_sq = weight.row_sq if isinstance(weight, QuantRows) else None
        return self._compute_norm(
            self._weight_rows(weight), lora_A, lora_B, scaling, base_sq, get_config().norm_chunk_bytes, 0.0
        )

    # -- forward -----------------------------------------------------------------------------

    def _weight_and_norm(self, base_layer, lora_A, lora_B, scaling) -> tuple[torch.Tensor, torch.Tensor]:
        """The base weight (a quantized one as a :class:`QuantRows` row source, never dequantized
        whole) and the row norm ``n`` of this forward."""
        if type(base_layer) is nn.Linear and type(base_layer.weight) is nn.Parameter:
            weight = base_layer.weight  # the common case, per forward: nothing to dequantize
        else:
            weight = quant_rows(base_layer)
            if weight is None:
                weight = dequantize_module_weight(base_layer)
        return weight, self.row_norm(weight, *self._factors(lora_A, lora_B), scaling)

    def _base_without_bias(self, x, base_layer, weight, base_result) -> torch.Tensor:
        if base_result is not None:
            bias = getattr(base_layer, "bias", None)
            return base_result - bias if bias is not None else base_result
        # dropout active: PEFT defines the base term on the dropped-out input; run it in W's dtype so
        # no fp32 copy of W is made (a quantized W through the base layer's own quantized matmul)
        if isinstance(weight, QuantRows):
            return weight.base_output(x)
        W = self._weight_rows(weight)
        return F.linear(x.to(W.dtype), W)

    def forward(
        self,
        x: torch.Tensor,
        *,
        lora_A: nn.Module,
        lora_B: nn.Module,
        scaling: float,
        base_layer: nn.Module,
        base_result: Optional[torch.Tensor] = None,
        adapter_name: Optional[str] = None,
    ) -> torch.Tensor:
        """DoRA's delta, to be added to the base output: ``(g − 1) ⊙ base + g·s ⊙ lora``.

        Args:
            x: input [..., d_in] (already dropped out by PEFT when dropout is active).
            lora_A: PEFT's ``nn.Linear`` holding ``A`` [r, d_in].
            lora_B: PEFT's ``nn.Linear`` holding ``B`` [d_out, r].
            scaling: ``s``.
            base_layer: the frozen base layer (its weight may be quantized).
            base_result: the base layer's output [..., d_out] (with bias), or ``None`` when dropout is
                active, in which case the base term is computed from ``x``.
            adapter_name: accepted for PEFT >= 0.19 callers; unused.

        Returns:
            [..., d_out] in the base output's dtype.
        """
        weight, norm = self._weight_and_norm(base_layer, lora_A, lora_B, scaling)
        lora_out = lora_B(lora_A(x))
        base = self._base_without_bias(x, base_layer, weight, base_result)
        out_dtype = base_result.dtype if base_result is not None else base.dtype
        cfg = get_config()
        g_terms = None
        if cfg.norm_cache:
            g_terms = self._g_cache.get(self.weight, norm, self._norm_cache.generation, base, scaling)
        if not torch.is_grad_enabled():
            delta = _compose_delta_chunked(base, lora_out, self.weight, norm, scaling, cfg.fwd_chunk_bytes, g_terms)
        else:
            delta = _compose_delta_eager(base, lora_out, self.weight, norm, scaling, -1, g_terms)
        return delta.to(out_dtype)

    def forward_output(
        self, x, result, *, lora_A, lora_B, scaling, base_layer, dropout_active: bool, adapter_name=None
    ) -> torch.Tensor:
        """The adapted layer's whole output from the running ``result`` [..., d_out] (with bias).

        What our variant calls: with the fused path one Triton pass reads ``result`` and the LoRA
        output and writes ``g ⊙ (result − bias + s·lora) + bias``; otherwise ``result + delta``.
        ``x`` is already dropped out when ``dropout_active``.
        """
        magnitude = self.weight  # read once: an nn.Module attribute lookup per access
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or result.requires_grad or magnitude.requires_grad or _trains(lora_A) or _trains(lora_B)
        )
        if not (self._fused_compose_supported and use_fused_compose(result, needs_grad)):
            base_result = None if dropout_active else result
            delta = self.forward(x, lora_A=lora_A, lora_B=lora_B, scaling=scaling, base_layer=base_layer,
                                 base_result=base_result, adapter_name=adapter_name)
            return result + delta.to(result.dtype)
        weight, norm = self._weight_and_norm(base_layer, lora_A, lora_B, scaling)
        ax = lora_A(x)
        B = _plain_lora_b_weight(lora_B, ax)
        if B is not None:
            # lora_B's GEMM inside the fused Function: ∂m then needs only the saved base (see
            # dora_fused_linear), not v = base + s·lora in fp32
            compose_lora_b = _lazy_module("dora_fused_linear").compose_lora_b_trusted
            if get_config().norm_cache:
                tail = self._tail_cache.get(magnitude, norm, self._norm_cache.generation, result, scaling)
            else:
                with torch.no_grad():
                    tail = _tail_vectors(magnitude, norm, result, scaling)
            if dropout_active:
                base_d = self._base_without_bias(x, base_layer, weight, None).to(result.dtype)
                return result + (compose_lora_b(base_d, ax, B, magnitude, norm, scaling, None, tail) - base_d)
            bias = getattr(base_layer, "bias", None)
            base = result if bias is None else result - bias
            return compose_lora_b(base, ax, B, magnitude, norm, scaling, bias, tail)
        dora_compose = _fused_module().compose_trusted
        lora_out = lora_B(ax)
        if dropout_active:
            # the base term is W·dropout(x): out = result + g ⊙ (base_d + s·lora) − base_d
            base_d = self._base_without_bias(x, base_layer, weight, None).to(result.dtype)
            return result + (dora_compose(base_d, lora_out, self.weight, norm, scaling) - base_d)
        bias = getattr(base_layer, "bias", None)
        # ∂m needs v = base + s·lora: the kernel keeps it in fp32 (precision of ∂m no worse than
        # upstream's; recovering it from the bf16 output instead measured 1.22x upstream's error)
        if bias is None:
            return dora_compose(result, lora_out, self.weight, norm, scaling)
        return dora_compose(result - bias, lora_out, self.weight, norm, scaling, bias=bias)

    def __repr__(self) -> str:
        return "lora.dora." + super().__repr__()


class DoraEmbeddingLayer(DoraLinearLayer):
    """DoRA for ``Embedding``: ``W`` rows are the columns of the embedding table (fan_in_fan_out)."""

    def _factors(self, lora_A, lora_B):
        # forward receives lora_embedding_A.T [num_emb, r] and lora_embedding_B.T [r, emb_dim]
        return lora_A.T, lora_B.T

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, embed_fn, adapter_name: Optional[str] = None):
        """Returns ``(g [emb_dim], g·s·(embed(x, A) @ B) [..., emb_dim])``; the variant computes
        ``g ⊙ base + that``."""
        A, B = self._factors(lora_A, lora_B)
        norm = self.row_norm(base_layer.weight, A, B, scaling)
        magnitude = self.weight
        g = magnitude / norm.to(magnitude.dtype if magnitude.dtype == torch.float64 else torch.float32)
        result_dora = g * (embed_fn(x, lora_A) @ lora_B) * scaling
        return g, result_dora


class _DoraConvNdLayer(DoraLinearLayer):
    """DoRA for ``ConvNd``: ``W`` rows are the flattened output filters; ``m`` is [1, out, 1, ...]."""

    _fused_compose_supported = False  # channels are dim 1; the eager compose handles them

    def _weight_rows(self, weight):
        return weight.reshape(weight.shape[0], -1)

    def _factors(self, lora_A, lora_B):
        A, B = _weight_of(lora_A), _weight_of(lora_B)
        r = A.shape[0]
        return A.reshape(r, -1), B.reshape(-1, r)

    def _compute_norm(self, W, A, B, scaling, base_sq, chunk_bytes, eps=DORA_NORM_EPS):
        if B.shape[0] == W.shape[0] and A.shape[1] == W.shape[1]:
            return super()._compute_norm(W, A, B, scaling, base_sq, chunk_bytes, eps)
        # grouped convs: PEFT defines the delta as (B·A) reshaped to W's shape, which does not
        # factor by rows; conv weights are small, so take the dense (chunked) norm
        delta = (B.detach() @ A.detach().to(B.dtype)).reshape(W.shape)
        return dense_row_norm(W, delta, scaling, chunk_bytes).clamp_min(eps)

    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name: Optional[str] = None) -> torch.Tensor:
        W = self._weight_rows(weight)
        out_dtype = torch.promote_types(weight.dtype, lora_weight.dtype)
        norm = dense_row_norm(W, lora_weight.reshape(W.shape), scaling).clamp_min(DORA_NORM_EPS)
        return norm.to(out_dtype).view((1, -1) + (1,) * (weight.dim() - 2))

    def _init_norm(self, weight, lora_A, lora_B, scaling):
        norm = super()._init_norm(weight, *self._factors(lora_A, lora_B), scaling)
        return norm.view((1, -1) + (1,) * (weight.dim() - 2))

    def row_norm(self, weight, lora_A, lora_B, scaling):
        return super().row_norm(weight, *self._factors(lora_A, lora_B), scaling)

    def forward(
        self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name: Optional[str] = None
    ) -> torch.Tensor:
        weight = base_layer.weight
        norm = self.row_norm(weight, lora_A.weight, lora_B.weight, scaling)
        if base_result is None:
            base = self.conv_fn(
                x.to(weight.dtype),
                weight,
                bias=None,
                stride=base_layer.stride,
                padding=base_layer.padding,
                dilation=base_layer.dilation,
                groups=base_layer.groups,
            )
            out_dtype = base.dtype
        else:
            base = base_result
            if base_layer.bias is not None:
                base = base - base_layer.bias.view((1, -1) + (1,) * (base_result.dim() - 2))
            out_dtype = base_result.dtype
        lora_out = lora_B(lora_A(x))
        delta = _compose_delta_eager(base, lora_out, self.weight, norm, scaling, 1)
        return delta.to(out_dtype)


class DoraConv1dLayer(_DoraConvNdLayer):
    def __init__(self, fan_in_fan_out):
        super().__init__(fan_in_fan_out)
        self.conv_fn = F.conv1d


class DoraConv2dLayer(_DoraConvNdLayer):
    def __init__(self, fan_in_fan_out):
        super().__init__(fan_in_fan_out)
        self.conv_fn = F.conv2d


class DoraConv3dLayer(_DoraConvNdLayer):
    def __init__(self, fan_in_fan_out):
        super().__init__(fan_in_fan_out)
        self.conv_fn = F.conv3d
