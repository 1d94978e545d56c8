"""Fused Triton kernels for DoRA: the compose (forward and backward) and the norm assembly.

Symbols follow DESIGN.md: base = W x, lora = B A x [T, d_out]; s; m, n [d_out]; g = m / n.
    out = g ⊙ (base + s·lora) + bias                     (fp32, rounded once to base.dtype)
    d_base = g ⊙ dy,  d_lora = s·g ⊙ dy,  d_m_i = Σ_t dy_ti·(base + s·lora)_ti / n_i   (n constant)
    n_i = max(sqrt(max(‖W_i‖² + 2s·Σ_j B_ij U_ij + s²·Σ_j (B G)_ij B_ij, 0)), eps)
Per op: private ``@triton.jit`` kernels (built on first use: importing this module needs only
torch), plain launchers, ``torch.library`` custom ops (``torch.compile`` traces them whole) with
the autograd formula, the ``FusedDoraCompose`` autograd.Function, one validated public entry.
Pure-PyTorch twins live in ``dora_fused_naive``. Kernels take CUDA tensors, or CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how the CPU tests run them.
"""

import contextlib
import os
from typing import Dict, List, Optional, Tuple

import torch

from . import dora_fused_launch as launch
from .dora_env import get_config  # standard library only: safe at import time
from .dora_fused_launch import next_pow2 as _next_pow2
from .dora_fused_naive import (  # noqa: F401 - the twins are re-exported
    compute_dtype, dora_compose_backward_reference, dora_compose_reference, dora_norm_assembly_reference)

__all__ = ["is_available", "set_autotune_comprehensive", "dora_compose", "dora_norm_assembly", "FusedDoraCompose",
           "dora_compose_reference", "dora_compose_backward_reference", "dora_norm_assembly_reference"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# What the compose forward keeps for d_m (only needed when m requires grad).
SAVE_NONE, SAVE_V, SAVE_OUT = 0, 1, 2

# fp32 x fp32 products in the norm's B·G on tensor cores: 3xTF32 keeps ~fp32
# accuracy at a fraction of the CUDA-core cost (ignored for bf16/fp16/fp64).
_NORM_DOT_PRECISION = "tf32x3"

# Compile options: fused multiply-add (one rounding of g·v + bias), stated so Triton does not warn.
_OPTS = {"enable_fp_fusion": True}

# Filled by _kernels(): the kernels' bodies resolve `tl` through module globals.
triton = None
tl = None

# -------- Availability and autotune configuration -----------------------------------------------

_triton_state: Dict[str, bool] = {}
_autotune_override: Optional[bool] = None


def _triton_importable() -> bool:
    if "ok" not in _triton_state:
        try:
            import triton.language  # noqa: F401
        except ImportError:
            _triton_state["ok"] = False
        else:
            _triton_state["ok"] = True
    return _triton_state["ok"]


_INTERPRET_VALUES = ("1", "true", "on", "yes")
_interpret_memo: Dict[object, bool] = {}


def _interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    # Called on every launch: read the raw value (POSIX keeps bytes in os.environ._data, which
    # skips the per-lookup decode) and memoize its meaning.
    data = getattr(os.environ, "_data", None)
    raw = data.get(b"TRITON_INTERPRET") if isinstance(data, dict) and os.name == "posix" \
        else os.environ.get("TRITON_INTERPRET")
    hit = _interpret_memo.get(raw)
    if hit is None:
        text = raw.decode() if isinstance(raw, bytes) else (raw or "0")
        hit = _interpret_memo[raw] = text.strip().lower() in _INTERPRET_VALUES
    return hit


def is_available() -> bool:
    """Whether the fused kernels can run here: Triton importable and CUDA (or the interpreter)."""
    if not _triton_importable():
        return False
    return _interpreting() or torch.cuda.is_available()


def set_autotune_comprehensive(flag: bool) -> None:
    """Choose the large autotune search space (True) or the small default list (False).

    Overrides ``DORA_AUTOTUNE_COMPREHENSIVE``; takes effect for kernels launched afterwards.
    """
    global _autotune_override
    if not isinstance(flag, bool):
        raise TypeError(f"set_autotune_comprehensive expects a bool, got {type(flag).__name__}")
    _autotune_override = flag


def _autotune_comprehensive() -> bool:
    """The setter's choice, else ``DORA_AUTOTUNE_COMPREHENSIVE`` from the validated config
    (:mod:`.dora_env`, the one place that reads the environment; asked on every launch)."""
    if _autotune_override is not None:
        return _autotune_override
    return get_config().autotune_comprehensive


# -------- Kernels (defined on first use so that importing this module needs only torch) ---------

_kernel_cache: Dict[bool, Dict[str, object]] = {}  # per mode: interpreted or compiled


def _load_triton() -> None:
    """Bind module globals ``triton`` and ``tl`` (the kernels resolve ``tl`` through them)."""
    global triton, tl
    if tl is None:
        import triton as _triton
        import triton.language as _tl

        triton, tl = _triton, _tl


def _kernels() -> Dict[str, object]:
    """The raw kernels; ``triton.jit`` picks interpreter or compiler when they are defined."""
    mode = _interpreting()
    if mode in _kernel_cache:
        return _kernel_cache[mode]
    _load_triton()

    @triton.jit
    def _compose_fwd_kernel(
        base_ptr, lora_ptr, m_ptr, n_ptr, bias_ptr, out_ptr, v_ptr,
        T, d_out, stride_base, stride_lora, stride_out, stride_v, s, T_BUCKET,
        HAS_BIAS: tl.constexpr, WRITE_V: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One [BLOCK_T, BLOCK_D] tile: read base and lora once, write out (and v) once.
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < d_out
        mask = (rows < T)[:, None] & cmask[None, :]
        m = tl.load(m_ptr + cols, mask=cmask, other=0.0).to(ACC)
        n = tl.load(n_ptr + cols, mask=cmask, other=1.0).to(ACC)
        if IS_FP64:
            g = m / n
        else:
            g = tl.div_rn(m, n)  # g ≈ 1: keep it exact to fp32, never rounded to bf16
        b = tl.load(base_ptr + rows[:, None] * stride_base + cols[None, :], mask=mask, other=0.0).to(ACC)
        lo = tl.load(lora_ptr + rows[:, None] * stride_lora + cols[None, :], mask=mask, other=0.0).to(ACC)
        v = b + s * lo
        out = g[None, :] * v
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_V:
            tl.store(v_ptr + rows[:, None] * stride_v + cols[None, :], v.to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _compose_bwd_kernel(
        dy_ptr, saved_ptr, m_ptr, n_ptr, dbase_ptr, dlora_ptr, pdm_ptr, pdb_ptr,
        T, d_out, t_chunk, stride_dy, stride_saved, stride_dbase, stride_dlora, s, T_BUCKET,
        NEED_DBASE: tl.constexpr, NEED_DLORA: tl.constexpr, NEED_DM: tl.constexpr, NEED_DBIAS: tl.constexpr,
        ACC: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Program (column block, T chunk): one read of dy (and of the saved v or out)
        # yields d_base, d_lora and this chunk's column sums for d_m and d_bias.
        pid_d = tl.program_id(0)
        pid_c = tl.program_id(1)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < d_out
        m = tl.load(m_ptr + cols, mask=cmask, other=0.0).to(ACC)
        n = tl.load(n_ptr + cols, mask=cmask, other=1.0).to(ACC)
        if IS_FP64:
            g = m / n
        else:
            g = tl.div_rn(m, n)
        sg = s * g
        acc_dm = tl.zeros([BLOCK_D], dtype=ACC)
        acc_db = tl.zeros([BLOCK_D], dtype=ACC)
        t_lo = pid_c * t_chunk
        t_hi = tl.minimum(t_lo + t_chunk, T)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            rows = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            mask = (rows < t_hi)[:, None] & cmask[None, :]
            dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
            if NEED_DM:  # both loads issued before any store: a store may alias, so none is moved past it
                w = tl.load(saved_ptr + rows[:, None] * stride_saved + cols[None, :], mask=mask, other=0.0)
            if NEED_DBASE:
                tl.store(dbase_ptr + rows[:, None] * stride_dbase + cols[None, :],
                         (g[None, :] * dy).to(dbase_ptr.dtype.element_ty), mask=mask)
            if NEED_DLORA:
                tl.store(dlora_ptr + rows[:, None] * stride_dlora + cols[None, :],
                         (sg[None, :] * dy).to(dlora_ptr.dtype.element_ty), mask=mask)
            if NEED_DM:
                acc_dm += tl.sum(dy * w.to(ACC), axis=0)
            if NEED_DBIAS:
                acc_db += tl.sum(dy, axis=0)
        if NEED_DM:
            tl.store(pdm_ptr + pid_c * d_out + cols, acc_dm, mask=cmask)
        if NEED_DBIAS:
            tl.store(pdb_ptr + pid_c * d_out + cols, acc_db, mask=cmask)

    @triton.jit
    def _norm_assembly_kernel(
        base_sq_ptr, U_ptr, B_ptr, G_ptr, m_ptr, n_ptr, g_ptr,
        d_out, r, stride_u, stride_b, stride_g, s, eps,
        ACC: tl.constexpr, IS_FP64: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # A block of rows i: cross_i = Σ_j B_ij U_ij and gram_i = Σ_jk B_ij G_jk B_ik.
        # G = A·Aᵀ is symmetric, so gram sums the diagonal blocks once and the
        # blocks above the diagonal twice (half the B·G work).
        pid = tl.program_id(0)
        rows = (pid * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        rmask = rows < d_out
        cross = tl.zeros([BLOCK_D], dtype=ACC)
        gram = tl.zeros([BLOCK_D], dtype=ACC)
        for j0 in range(0, r, BLOCK_R):
            cj = j0 + tl.arange(0, BLOCK_R)
            jmask = cj < r
            mj = rmask[:, None] & jmask[None, :]
            Bj = tl.load(B_ptr + rows[:, None] * stride_b + cj[None, :], mask=mj, other=0.0)
            Uj = tl.load(U_ptr + rows[:, None] * stride_u + cj[None, :], mask=mj, other=0.0)
            Bj_acc = Bj.to(ACC)
            cross += tl.sum(Bj_acc * Uj.to(ACC), axis=1)
            Bj_dot = Bj.to(DOT)
            for k0 in range(j0, r, BLOCK_R):
                ck = k0 + tl.arange(0, BLOCK_R)
                kmask = ck < r
                Gjk = tl.load(G_ptr + cj[:, None] * stride_g + ck[None, :],
                              mask=jmask[:, None] & kmask[None, :], other=0.0)
                Bk = tl.load(B_ptr + rows[:, None] * stride_b + ck[None, :],
                             mask=rmask[:, None] & kmask[None, :], other=0.0)
                BG = tl.dot(Bj_dot, Gjk.to(DOT), input_precision=DOT_PRECISION, out_dtype=ACC)
                weight = tl.where(k0 == j0, 1.0, 2.0)
                gram += weight * tl.sum(BG * Bk.to(ACC), axis=1)
        base_sq = tl.load(base_sq_ptr + rows, mask=rmask, other=1.0).to(ACC)
        nsq = tl.maximum(base_sq + (2.0 * s) * cross + (s * s) * gram, 0.0)  # clamp rounding below 0
        m = tl.load(m_ptr + rows, mask=rmask, other=0.0).to(ACC)
        if IS_FP64:
            n = tl.maximum(tl.sqrt(nsq), eps)
            g = m / n
        else:
            n = tl.maximum(tl.sqrt_rn(nsq), eps)
            g = tl.div_rn(m, n)
        tl.store(n_ptr + rows, n, mask=rmask)
        tl.store(g_ptr + rows, g, mask=rmask)

    _kernel_cache[mode] = dict(compose_fwd=_compose_fwd_kernel, compose_bwd=_compose_bwd_kernel,
                               norm=_norm_assembly_kernel)
    return _kernel_cache[mode]


_AUTOTUNE_KEYS = {
    "compose_fwd": ["d_out", "T_BUCKET", "HAS_BIAS", "WRITE_V"],
    "compose_bwd": ["d_out", "T_BUCKET", "NEED_DBASE", "NEED_DLORA", "NEED_DM", "NEED_DBIAS"],
    "norm": ["d_out", "r"],
}
_tuned_cache: Dict[tuple, object] = {}
# Kernels that live in a sibling module (dora_fused_linear), launched through the same autotune and
# direct-launch machinery: name -> (factory, autotune key, configs(comprehensive, interp), prune). The
# factory runs once per mode, after ``triton`` / ``tl`` are bound, and returns the jit function.
_registered: Dict[str, tuple] = {}


def register_kernel(name: str, factory, autotune_key: List[str], configs, prune) -> None:
    _registered[name] = (factory, autotune_key, configs, prune)


def _raw_kernel(name: str):
    kernels = _kernels()
    raw = kernels.get(name)
    if raw is None:
        raw = kernels[name] = _registered[name][0]()
    return raw


def _tuned(name: str):
    """The autotuned wrapper of kernel ``name`` for the current config list."""
    raw = _raw_kernel(name)
    interp = _interpreting()
    comprehensive = _autotune_comprehensive()
    key = (name, interp, comprehensive)
    if key not in _tuned_cache:
        if name in _registered:
            _, autotune_key, configs_of, prune = _registered[name]
            configs = configs_of(comprehensive, interp)
        else:
            autotune_key = _AUTOTUNE_KEYS[name]
            configs = launch.interpreter_configs()[name] if interp else launch.autotune_configs(comprehensive)[name]
            prune = launch.prune_norm if name == "norm" else launch.prune_compose
        _tuned_cache[key] = triton.autotune(
            configs=configs, key=autotune_key, prune_configs_by={"early_config_prune": prune}
        )(raw)
    return _tuned_cache[key]


# Config chosen per (kernel, mode, search space, tuning key, dtypes): after the first launch of a
# key, later launches call the raw kernel with it and skip the autotuner's per-call Python
# (H100, Triton 3.6: a compose launch's host cost 95 -> 57 µs; code/results/diagnostics/launch_probe_*).
_chosen: Dict[tuple, Dict[str, object]] = {}


def _launch_config(kernel, key: tuple, grid: tuple, args: tuple, consts: dict, config: dict) -> None:
    """Launch ``kernel`` with a known config: its compiled binary directly where that is allowed, else
    through Triton's JIT (always under the interpreter). ``key`` names the call in the direct cache."""
    if _interpreting() or not launch.direct_launch_allowed():
        kernel[grid](*args, **consts, **config)
    else:
        launch.launch_direct(kernel, key, grid, args, consts, config)


def _launch_tuned(name: str, grid, args: tuple, consts: dict, key: tuple) -> None:
    """Launch kernel ``name`` on ``grid(meta)`` with the autotuned config for ``key``."""
    interp = _interpreting()
    full_key = (name, interp, _autotune_comprehensive(), key)
    chosen = _chosen.get(full_key)
    if chosen is not None:
        _launch_config(_raw_kernel(name), full_key, grid(chosen), args, consts, chosen)
        return
    tuner = _tuned(name)
    tuner[grid](*args, **consts)
    best = getattr(tuner, "best_config", None)
    if best is not None:  # the next launch of this key goes straight to the kernel
        _chosen[full_key] = best.all_kwargs()


# -------- Launchers: shapes, strides, grids. No user-input validation here. ---------------------


def _check_runnable(t: torch.Tensor) -> None:
    if not _triton_importable():
        raise RuntimeError("dorafactors fused kernels need Triton (pip install triton); it is not importable")
    if not t.is_cuda and not _interpreting():
        raise ValueError(
            f"fused DoRA kernels need CUDA tensors, got device {t.device}; "
            "set TRITON_INTERPRET=1 to run them on CPU through Triton's interpreter"
        )


_NO_SWITCH = contextlib.nullcontext()


def _on_device(t: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensors' device (a switch only when
    # it differs: the common case costs no device-context enter/exit per launch)
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_SWITCH


def _acc_of(dtype: torch.dtype):
    return (tl.float64, True) if dtype == torch.float64 else (tl.float32, False)


def _rows(x: torch.Tensor, d_out: int) -> torch.Tensor:
    """``x`` [..., d_out] as [T, d_out] with unit column stride (copies only when needed)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, d_out)
    if d_out > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def _launch_rows(x: torch.Tensor, d_out: int) -> torch.Tensor:
    """``x`` [..., d_out] as rows for a kernel launch: a contiguous ``x`` of any rank as it is (its
    rows are ``d_out`` apart; no reshape or view op per launch), anything else through :func:`_rows`."""
    return x if x.dim() >= 2 and x.is_contiguous() else _rows(x, d_out)


def _n_rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _row_stride(x: torch.Tensor) -> int:
    """Distance between rows of a launch-rows tensor: a 2-D one's stride(0); an N-d one is contiguous,
    so ``d_out`` (never stride(-2): a size-1 dimension's stride is arbitrary in a contiguous tensor)."""
    return x.stride(0) if x.dim() == 2 else x.shape[-1]


def _vec(x: torch.Tensor) -> torch.Tensor:
    # per launch: skip the reshape (an aten call) for what is already a flat contiguous vector
    return x if x.dim() == 1 and x.is_contiguous() else x.reshape(-1).contiguous()


def _cdiv(a: int, b: int) -> int:
    # host-side grids: Triton >= 3.7's ``triton.cdiv`` is a constexpr function (~3 µs per call)
    return -(-a // b)


def _t_bucket(T: int) -> int:
    return min(_next_pow2(max(T, 1)), 1 << 16)


def _launch_compose_fwd(
    base2d, lora2d, m, n, s, bias, write_v, *, out=None, v=None, block_t=None, block_d=None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """out (base dtype) and, if ``write_v``, v = base + s·lora, both shaped like ``base2d``: rows of
    ``d_out`` (any rank, see :func:`_launch_rows`; ``lora2d`` may have another rank)."""
    _check_runnable(base2d)
    d_out, T = base2d.shape[-1], _n_rows(base2d)
    if out is None:
        out = torch.empty(base2d.shape, dtype=base2d.dtype, device=base2d.device)
    if write_v and v is None:
        # v is kept in the compute dtype (fp32): rounding it to bf16 would make ∂m less precise
        # than upstream's own bf16 result (measured on the H100: 1.22x its error against fp64)
        v = torch.empty(base2d.shape, dtype=compute_dtype(base2d, lora2d, m, n, bias), device=base2d.device)
    if T == 0 or d_out == 0:
        return out, v
    _kernels()
    acc, is64 = _acc_of(compute_dtype(base2d, lora2d, m, n, bias))
    m1, n1 = _vec(m), _vec(n)
    b1 = _vec(bias) if bias is not None else m1
    v_arg = v if write_v else out
    args = (base2d, lora2d, m1, n1, b1, out, v_arg, T, d_out,
            _row_stride(base2d), _row_stride(lora2d), _row_stride(out), _row_stride(v_arg), float(s), _t_bucket(T))
    consts = dict(HAS_BIAS=bias is not None, WRITE_V=bool(write_v), ACC=acc, IS_FP64=is64, **_OPTS)
    with _on_device(base2d):
        if block_t is not None:
            grid = (_cdiv(T, block_t), _cdiv(d_out, block_d))
            _kernels()["compose_fwd"][grid](*args, **consts, BLOCK_T=block_t, BLOCK_D=block_d)
        else:
            grid = lambda META: (_cdiv(T, META["BLOCK_T"]), _cdiv(d_out, META["BLOCK_D"]))  # noqa: E731
            _launch_tuned("compose_fwd", grid, args, consts,
                          (d_out, args[-1], consts["HAS_BIAS"], consts["WRITE_V"], base2d.dtype, lora2d.dtype,
                           out.dtype, v_arg.dtype, m1.dtype, n1.dtype, b1.dtype))
    return out, (v if write_v else None)


def _default_t_chunk(T: int) -> int:
    # ~32-64 chunks of T: enough programs to fill the GPU, and a tiny [chunks, d_out] partial.
    rows = max(128, -(-T // 64))
    return 64 * -(-rows // 64)


def _launch_compose_bwd(
    dy2d, saved2d, m, n, s, *, saved_is_out, need_dbase, need_dlora, need_dm, need_dbias,
    lora_dtype, acc_dtype, d_base=None, d_lora=None, block_t=None, block_d=None, t_chunk=None, reduce_dm=True,
):
    """(d_base in dy dtype, d_lora in lora dtype, both shaped like ``dy2d``; d_m [d_out], d_bias [d_out])
    with d_m, d_bias in ``acc_dtype``; entries not asked for are None. ``reduce_dm=False`` returns
    d_m's per-chunk partial sums ``Σ_t dy·saved`` [chunks, d_out] instead (the caller finishes it)."""
    _check_runnable(dy2d)
    d_out, T = dy2d.shape[-1], _n_rows(dy2d)
    dev = dy2d.device
    if need_dbase and d_base is None:
        d_base = torch.empty(dy2d.shape, dtype=dy2d.dtype, device=dev)
    if need_dlora and d_lora is None:
        d_lora = torch.empty(dy2d.shape, dtype=lora_dtype, device=dev)
    d_m = d_bias = None
    if T == 0 or d_out == 0:
        if need_dm:
            d_m = torch.zeros(d_out if reduce_dm else (1, d_out), dtype=acc_dtype, device=dev)
        if need_dbias:
            d_bias = torch.zeros(d_out, dtype=acc_dtype, device=dev)
        return (d_base if need_dbase else None, d_lora if need_dlora else None, d_m, d_bias)
    _kernels()
    acc, is64 = _acc_of(acc_dtype)
    t_chunk = int(t_chunk) if t_chunk is not None else _default_t_chunk(T)
    n_chunks = _cdiv(T, t_chunk)
    m1, n1 = _vec(m), _vec(n)
    pdm = torch.empty((n_chunks, d_out), dtype=acc_dtype, device=dev) if need_dm else m1
    pdb = torch.empty((n_chunks, d_out), dtype=acc_dtype, device=dev) if need_dbias else m1
    sv = saved2d if need_dm else dy2d
    dbase_arg = d_base if need_dbase else dy2d
    dlora_arg = d_lora if need_dlora else dy2d
    args = (dy2d, sv, m1, n1, dbase_arg, dlora_arg, pdm, pdb, T, d_out, t_chunk,
            _row_stride(dy2d), _row_stride(sv), _row_stride(dbase_arg), _row_stride(dlora_arg), float(s), _t_bucket(T))
    consts = dict(NEED_DBASE=bool(need_dbase), NEED_DLORA=bool(need_dlora), NEED_DM=bool(need_dm),
                  NEED_DBIAS=bool(need_dbias), ACC=acc, IS_FP64=is64, **_OPTS)
    with _on_device(dy2d):
        if block_t is not None:
            _kernels()["compose_bwd"][(_cdiv(d_out, block_d), n_chunks)](
                *args, **consts, BLOCK_T=block_t, BLOCK_D=block_d)
        else:
            grid = lambda META: (_cdiv(d_out, META["BLOCK_D"]), n_chunks)  # noqa: E731
            _launch_tuned("compose_bwd", grid, args, consts,
                          (d_out, args[-1], need_dbase, need_dlora, need_dm, need_dbias, t_chunk, acc_dtype)
                          + tuple(t.dtype for t in args[:8]))
    if need_dm:
        # The tiny reduction over T chunks; v/n = out/m when out was saved (bias None).
        d_m = pdm.sum(0).div_((m1 if saved_is_out else n1).to(acc_dtype)) if reduce_dm else pdm
    if need_dbias:
        d_bias = pdb.sum(0)
    return (d_base if need_dbase else None, d_lora if need_dlora else None, d_m, d_bias)


def _launch_norm_assembly(base_sq, U, B, G, s, m, eps, *, n_out=None, g_out=None, block_d=None, block_r=None):
    """(n, g) [d_out] in fp32 (fp64 if any input is fp64)."""
    _check_runnable(B)
    d_out, r = B.shape
    acc_dtype = compute_dtype(base_sq, U, B, G, m)
    dev = B.device
    n_out = torch.empty(d_out, dtype=acc_dtype, device=dev) if n_out is None else n_out
    g_out = torch.empty(d_out, dtype=acc_dtype, device=dev) if g_out is None else g_out
    if d_out == 0:
        return n_out, g_out
    _kernels()
    acc, is64 = _acc_of(acc_dtype)
    base1, m1 = _vec(base_sq), _vec(m)
    if r == 0:  # no low-rank term: never dereference the empty factors
        U2 = B2 = G2 = base1.reshape(d_out, 1)
        su = sb = sg = 1
    else:
        U2, B2, G2 = _rows(U, r), _rows(B, r), _rows(G, r)
        su, sb, sg = U2.stride(0), B2.stride(0), G2.stride(0)
    # bf16/fp16 factors go to tensor cores as they are (exact products, fp32 sums). Triton's
    # interpreter multiplies bf16 as raw integers, so there the dot runs in fp32.
    if B.dtype == G.dtype and B.dtype in (torch.bfloat16, torch.float16) and not _interpreting():
        dot = tl.bfloat16 if B.dtype == torch.bfloat16 else tl.float16
    else:
        dot = acc
    precision = _NORM_DOT_PRECISION if dot == tl.float32 else "ieee"
    args = (base1, U2, B2, G2, m1, n_out, g_out, d_out, r, su, sb, sg, float(s), float(eps))
    consts = dict(ACC=acc, IS_FP64=is64, DOT=dot, DOT_PRECISION=precision, **_OPTS)
    with _on_device(B):
        if block_d is not None:
            _kernels()["norm"][(_cdiv(d_out, block_d),)](*args, **consts, BLOCK_D=block_d, BLOCK_R=block_r)
        else:
            _launch_tuned("norm", lambda META: (_cdiv(d_out, META["BLOCK_D"]),), args, consts,
                          (d_out, r, str(dot)) + tuple(t.dtype for t in args[:7]))
    return n_out, g_out


# -------- Custom ops (torch.compile sees opaque ops with fake impls) and the autograd formula ----


def _compose_fwd_impl(base, lora, m, n, s, bias, save_mode):
    d_out = base.shape[-1]
    out2d, v2d = _launch_compose_fwd(_launch_rows(base, d_out), _launch_rows(lora, d_out), m, n, s, bias,
                                     save_mode == SAVE_V)
    out = _shaped(out2d, base.shape)
    v = _shaped(v2d, base.shape) if v2d is not None else base.new_empty(0)
    return out, v


def _shaped(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t if t.shape == shape else t.view(shape)


def _compose_bwd_impl(dy, saved, m, n, s, save_mode, need_dbase, need_dlora, need_dm, need_dbias,
                      lora_dtype, acc_dtype):
    d_out = dy.shape[-1]
    saved2d = _launch_rows(saved, d_out) if (need_dm and saved is not None) else None
    d_base, d_lora, d_m, d_bias = _launch_compose_bwd(
        _launch_rows(dy, d_out), saved2d, m, n, s, saved_is_out=save_mode == SAVE_OUT, need_dbase=need_dbase,
        need_dlora=need_dlora, need_dm=need_dm, need_dbias=need_dbias, lora_dtype=lora_dtype, acc_dtype=acc_dtype)
    # Outputs not asked for are fresh empty tensors (custom-op outputs may not alias).
    return (
        _shaped(d_base, dy.shape) if d_base is not None else dy.new_empty(0),
        _shaped(d_lora, dy.shape) if d_lora is not None else dy.new_empty(0, dtype=lora_dtype),
        d_m if d_m is not None else dy.new_empty(0, dtype=acc_dtype),
        d_bias if d_bias is not None else dy.new_empty(0, dtype=acc_dtype),
    )


def _setup_context(ctx, inputs, output):
    base, lora, m, n, s, bias, save_mode = inputs
    out, v = output
    ctx.s = s
    ctx.save_mode = save_mode
    ctx.lora_dtype = lora.dtype
    ctx.acc_dtype = compute_dtype(base, lora, m, n, bias)
    ctx.m_meta = (m.shape, m.dtype)
    ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
    saved = v if save_mode == SAVE_V else (out if save_mode == SAVE_OUT else None)
    ctx.save_for_backward(m, n, saved)


def _backward(ctx, dy, *unused, bwd=None):
    m, n, saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dm = bool(need[2])
    if need_dm and saved is None:
        raise RuntimeError("dora_compose: m needs a gradient but the forward ran without saving for it")
    need_dbias = ctx.bias_meta is not None and bool(need[5])
    d_base, d_lora, d_m, d_bias = (bwd or torch.ops.dorafactors.dora_compose_bwd)(
        dy, saved, m, n, ctx.s, ctx.save_mode, bool(need[0]), bool(need[1]), need_dm, need_dbias,
        ctx.lora_dtype, ctx.acc_dtype)
    return (
        d_base if need[0] else None,
        d_lora if need[1] else None,
        d_m.to(ctx.m_meta[1]).reshape(ctx.m_meta[0]) if need_dm else None,
        None,
        None,
        d_bias.to(ctx.bias_meta[1]).reshape(ctx.bias_meta[0]) if need_dbias else None,
        None,
    )


def _register_ops() -> None:
    try:  # another copy of this file (dorafactors / peft.tuners.lora) already registered them
        torch.ops.dorafactors.dora_compose_fwd
        return
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("dorafactors::dora_compose_fwd", mutates_args=())
    def dora_compose_fwd(
        base: torch.Tensor, lora: torch.Tensor, m: torch.Tensor, n: torch.Tensor, s: float,
        bias: Optional[torch.Tensor], save_mode: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return _compose_fwd_impl(base, lora, m, n, s, bias, save_mode)

    @dora_compose_fwd.register_fake
    def _(base, lora, m, n, s, bias, save_mode):
        v_dtype = compute_dtype(base, lora, m, n, bias) if save_mode == SAVE_V else base.dtype
        return base.new_empty(base.shape), base.new_empty(base.shape if save_mode == SAVE_V else (0,), dtype=v_dtype)

    dora_compose_fwd.register_autograd(_backward, setup_context=_setup_context)

    @torch.library.custom_op("dorafactors::dora_compose_bwd", mutates_args=())
    def dora_compose_bwd(
        dy: torch.Tensor, saved: Optional[torch.Tensor], m: torch.Tensor, n: torch.Tensor, s: float,
        save_mode: int, need_dbase: bool, need_dlora: bool, need_dm: bool, need_dbias: bool,
        lora_dtype: torch.dtype, acc_dtype: torch.dtype,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _compose_bwd_impl(dy, saved, m, n, s, save_mode, need_dbase, need_dlora, need_dm, need_dbias,
                                 lora_dtype, acc_dtype)

    @dora_compose_bwd.register_fake
    def _(dy, saved, m, n, s, save_mode, need_dbase, need_dlora, need_dm, need_dbias, lora_dtype, acc_dtype):
        d_out = dy.shape[-1]
        return (
            dy.new_empty(dy.shape if need_dbase else (0,)),
            dy.new_empty(dy.shape if need_dlora else (0,), dtype=lora_dtype),
            dy.new_empty((d_out,) if need_dm else (0,), dtype=acc_dtype),
            dy.new_empty((d_out,) if need_dbias else (0,), dtype=acc_dtype),
        )

    @torch.library.custom_op("dorafactors::dora_norm_assembly", mutates_args=())
    def dora_norm_assembly_op(
        base_sq: torch.Tensor, U: torch.Tensor, B: torch.Tensor, G: torch.Tensor, s: float,
        m: torch.Tensor, eps: float,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return _launch_norm_assembly(base_sq, U, B, G, s, m, eps)

    @dora_norm_assembly_op.register_fake
    def _(base_sq, U, B, G, s, m, eps):
        acc = compute_dtype(base_sq, U, B, G, m)
        return B.new_empty((B.shape[0],), dtype=acc), B.new_empty((B.shape[0],), dtype=acc)


_register_ops()


class FusedDoraCompose(torch.autograd.Function):
    """``out = (m / n) ⊙ (base + s·lora) + bias`` with the fused Triton forward and backward.

    ``apply(base, lora, m, n, s, bias, save_out_for_mag_grad)``; unvalidated:
    prefer :func:`dora_compose`, which also stays whole under ``torch.compile``.
    """

    @staticmethod
    def forward(ctx, base, lora, m, n, s, bias, save_out_for_mag_grad):
        if ctx.needs_input_grad[2]:
            save_mode = SAVE_OUT if save_out_for_mag_grad else SAVE_V
        else:
            save_mode = SAVE_NONE
        out, v = _compose_fwd_impl(base, lora, m, n, s, bias, save_mode)
        _setup_context(ctx, (base, lora, m, n, s, bias, save_mode), (out, v))
        return out

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy, bwd=_compose_bwd_impl)


# -------- Validated public entries --------------------------------------------------------------


def _check_tensor(fn: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED_DTYPES:
        accepted = ", ".join(str(d) for d in _SUPPORTED_DTYPES)
        raise TypeError(f"{fn}: `{name}` has dtype {t.dtype}; accepted dtypes: {accepted}")


def _check_numel(fn: str, name: str, t: torch.Tensor, d_out: int) -> None:
    if t.numel() != d_out:
        raise ValueError(f"{fn}: `{name}` has shape {tuple(t.shape)} ({t.numel()} elements); expected d_out={d_out}")


def _check_number(fn: str, name: str, x) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{fn}: `{name}` must be a Python float or int, got {type(x).__name__}")


def _check_devices(fn: str, named: List[Tuple[str, Optional[torch.Tensor]]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t is not None and t.device != first.device:
            raise ValueError(
                f"{fn}: `{name}` is on {t.device} but `{first_name}` is on {first.device}; all inputs must share one device"
            )


def dora_compose(base: torch.Tensor, lora: torch.Tensor, m: torch.Tensor, n: torch.Tensor, s: float,
                 bias: Optional[torch.Tensor] = None, *, save_out_for_mag_grad: bool = False) -> torch.Tensor:
    """Fused DoRA compose: ``out = (m / n) ⊙ (base + s·lora) + bias``.

    base, lora: [..., d_out] (same shape; fp16/bf16/fp32/fp64, may differ);
    m: [d_out] magnitude; n: [d_out] row norm, already clamped >= eps, treated
    as a constant; bias: optional [d_out]; s: Python float. Returns ``out``
    [..., d_out] in ``base.dtype``, computed in fp32 and rounded once.

    Backward gives d_base, d_lora, d_m and d_bias from one pass over dy. For
    d_m the forward keeps ``v = base + s·lora`` [..., d_out] in fp32; with
    ``save_out_for_mag_grad=True`` it keeps nothing new and recovers
    ``v / n = out / m`` from the output instead, which the caller may ask for
    only when ``bias is None`` and no ``m_i == 0``. When m needs no gradient
    nothing of size [..., d_out] is saved. Under ``save_out_for_mag_grad``,
    modifying ``out`` in place before backward is an error (autograd checks).
    """
    fn = "dora_compose"
    for name, t in (("base", base), ("lora", lora), ("m", m), ("n", n)):
        _check_tensor(fn, name, t)
    if bias is not None:
        _check_tensor(fn, "bias", bias)
    _check_number(fn, "s", s)
    if base.dim() < 1:
        raise ValueError(f"{fn}: `base` must have at least one dimension [..., d_out], got a scalar")
    if lora.shape != base.shape:
        raise ValueError(f"{fn}: `lora` has shape {tuple(lora.shape)} but `base` has {tuple(base.shape)}; they must match")
    d_out = base.shape[-1]
    _check_numel(fn, "m", m, d_out)
    _check_numel(fn, "n", n, d_out)
    if bias is not None:
        _check_numel(fn, "bias", bias, d_out)
    _check_devices(fn, [("base", base), ("lora", lora), ("m", m), ("n", n), ("bias", bias)])
    if not isinstance(save_out_for_mag_grad, bool):
        raise TypeError(f"{fn}: `save_out_for_mag_grad` must be a bool, got {type(save_out_for_mag_grad).__name__}")
    if save_out_for_mag_grad and bias is not None:
        raise ValueError(f"{fn}: save_out_for_mag_grad=True needs bias=None (out - bias loses v's precision)")
    return compose_trusted(base, lora, m, n, s, bias, save_out_for_mag_grad=save_out_for_mag_grad)


def compose_trusted(base: torch.Tensor, lora: torch.Tensor, m: torch.Tensor, n: torch.Tensor, s: float,
                    bias: Optional[torch.Tensor] = None, *, save_out_for_mag_grad: bool = False) -> torch.Tensor:
    """:func:`dora_compose` without input validation, for callers that built the inputs themselves
    (the DoRA layer, on every forward: validation is ~20 Python checks per call)."""
    n, s = n.detach(), float(s)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (base, lora, m, bias))
    if torch.compiler.is_compiling():  # the custom op: one opaque node for dynamo / AOTAutograd
        save_mode = (SAVE_OUT if save_out_for_mag_grad else SAVE_V) if grad and m.requires_grad else SAVE_NONE
        return torch.ops.dorafactors.dora_compose_fwd(base, lora, m, n, s, bias, save_mode)[0]
    if grad:  # eager: the same launchers with less dispatch overhead than the custom op
        return FusedDoraCompose.apply(base, lora, m, n, s, bias, save_out_for_mag_grad)
    return _compose_fwd_impl(base, lora, m, n, s, bias, SAVE_NONE)[0]


def norm_assembly_trusted(base_sq: torch.Tensor, U: torch.Tensor, B: torch.Tensor, G: torch.Tensor, s: float,
                          m: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`dora_norm_assembly` without validation, for the layer's own detached inputs: the
    launcher directly (the custom op's dispatch costs ~0.3 ms of host time), the op under compile."""
    if torch.compiler.is_compiling():
        return torch.ops.dorafactors.dora_norm_assembly(base_sq, U, B, G, float(s), m, float(eps))
    return _launch_norm_assembly(base_sq, U, B, G, float(s), m, float(eps))


def dora_norm_assembly(base_sq: torch.Tensor, U: torch.Tensor, B: torch.Tensor, G: torch.Tensor, s: float,
                       m: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row norm of ``W + s·B·A`` from factored terms, in one kernel: returns ``(n, g)``.

    base_sq: [d_out] (= ‖W_i‖²); U: [d_out, r] (= W·Aᵀ); B: [d_out, r];
    G: [r, r] (= A·Aᵀ, symmetric: only its upper block triangle is read);
    m: [d_out]; s: float; eps: float > 0.
    ``n = max(sqrt(max(base_sq + 2s·Σ_j B_ij U_ij + s²·Σ_j (B G)_ij B_ij, 0)), eps)``
    and ``g = m / n``, both [d_out] fp32 (fp64 if any input is fp64), detached.
    """
    fn = "dora_norm_assembly"
    for name, t in (("base_sq", base_sq), ("U", U), ("B", B), ("G", G), ("m", m)):
        _check_tensor(fn, name, t)
    _check_number(fn, "s", s)
    _check_number(fn, "eps", eps)
    if not (eps > 0 and eps < float("inf")):
        raise ValueError(f"{fn}: `eps` must be a finite number > 0, got {eps}")
    if B.dim() != 2:
        raise ValueError(f"{fn}: `B` must be [d_out, r], got shape {tuple(B.shape)}")
    d_out, r = B.shape
    if U.shape != B.shape:
        raise ValueError(f"{fn}: `U` has shape {tuple(U.shape)}; expected [d_out, r] = {tuple(B.shape)} like `B`")
    if G.shape != (r, r):
        raise ValueError(f"{fn}: `G` has shape {tuple(G.shape)}; expected [r, r] = ({r}, {r})")
    _check_numel(fn, "base_sq", base_sq, d_out)
    _check_numel(fn, "m", m, d_out)
    _check_devices(fn, [("B", B), ("base_sq", base_sq), ("U", U), ("G", G), ("m", m)])
    return torch.ops.dorafactors.dora_norm_assembly(
        base_sq.detach(), U.detach(), B.detach(), G.detach(), float(s), m.detach(), float(eps)
    )
