"""The fused DoRA tail of a linear layer: ``lora_B``'s GEMM, the compose, and a magnitude
gradient that needs no saved ``v``.

    lora = ax·Bᵀ                       (ax = A·x [T, r], B [d_out, r])
    out  = g ⊙ (base + s·lora) + bias,  g = m / n

The magnitude gradient ``∂m_i = Σ_t dy_ti·(base + s·lora)_ti / n_i`` splits into a base part,
summed by the compose backward kernel from the saved ``base``, and a LoRA part that factors
through the same ``[d_out, r]`` product LoRA computes for ``∂B`` anyway:

    Σ_t dy_ti·lora_ti = Σ_j B_ij·P_ij,   P = dyᵀ·ax
    ∂B = (s·g) ⊙_rows P,   ∂ax = dy·((s·g) ⊙_rows B),   ∂base = g ⊙ dy

So the backward costs LoRA's two GEMMs plus one elementwise pass (read dy and base, write
∂base), and the forward keeps ``base`` in its own dtype instead of ``v`` in fp32: half the
saved bytes, and two fewer [T, d_out] passes than saving ``v``. What is left over [d_out, r]
(∂m's two parts summed and scaled, ∂B, the scaled ``B`` for ∂ax) is one small kernel: the step
is host-bound on many layers, and that is one launch instead of seven torch ops.

The forward (bf16/fp16 activations) is one kernel too: ``lora = ax·Bᵀ`` accumulated in fp32 over r
per output tile, with ``g ⊙ (base + s·lora) + bias`` as the GEMM's epilogue, so the LoRA product is
never written out. fp32 and fp64 activations keep cuBLAS's GEMM followed by the compose kernel.
"""

from typing import Optional

import torch

from . import dora_fused as _fused
from .dora_fused import _launch_compose_bwd, _launch_compose_fwd, _launch_rows, _rows, _shaped
from .dora_fused_naive import lora_b_tail_backward_reference

__all__ = ["FusedDoraLoraB", "TailVectors", "compose_lora_b", "tail_vectors"]


_MM_OUT_DTYPE: dict = {}  # device type -> whether torch.mm takes out_dtype (asked once: a failing call is slow)


# Below this many columns (the rank) a bf16 P is a bf16 GEMM, rounded once as LoRA's own ∂B is, then
# widened. On an H200 the fp32-output GEMM made the Qwen3-VL-8B r=16 window 1.317x LoRA against
# 1.155x (same-process A/B), although alone it times like the other (code/results/diagnostics/
# *_r16-minN*.json, mm_out_dtype_h200.json); r=384 keeps the fp32 output (measured: 1.068x LoRA).
# fp16 always keeps it: fp16's range can overflow where fp32's does not.
_MM_OUT_DTYPE_MIN_N = 64


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` accumulated in fp32 and returned in ``acc``: on CUDA one rounding (a fp32-output GEMM),
    except bf16 below ``_MM_OUT_DTYPE_MIN_N`` columns, rounded to bf16 first (as LoRA's ∂B)."""
    if a.is_cuda and acc == torch.float32 and (
            a.dtype == torch.float16 or (a.dtype == torch.bfloat16 and b.shape[1] >= _MM_OUT_DTYPE_MIN_N)):
        if _MM_OUT_DTYPE.get(a.device.type, True):
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except (RuntimeError, TypeError, NotImplementedError):  # a torch without mm's out_dtype
                _MM_OUT_DTYPE[a.device.type] = False
    out = torch.mm(a, b)
    return out if out.dtype == acc else out.to(acc)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class TailVectors:
    """Per-column fp32 vectors of one layer (fp64 if ``m`` or ``n`` is), detached, [d_out] each:
    ``m`` and ``n`` for the kernels, ``sg = s·m/n`` (as a [d_out, 1] column) and ``s_over_n = s/n``
    for the backward's scales of ∂B, ∂(A·x) and ∂m. Built once per norm and magnitude (the layer
    caches it), then handed to every forward as a constant: no per-call casts or slicing, and
    nothing for autograd (or a checkpoint's hooks) to save.

    fp32 vectors where the kernels run (CUDA outside torch.compile, or the interpreter) come from one
    small kernel writing all four rows of one buffer; elsewhere from the same arithmetic in torch ops
    (about a dozen host ops, paid after every optimizer step by every adapted linear)."""

    __slots__ = ("m", "n", "sg", "s_over_n")

    def __init__(self, m: torch.Tensor, n: torch.Tensor, s: float) -> None:
        acc = torch.float64 if torch.float64 in (m.dtype, n.dtype) else torch.float32
        with torch.no_grad():
            if acc == torch.float32 and _tail_vectors_kernel_applies(m, n):
                self.m, self.n, sg, self.s_over_n = _launch_tail_vectors(m, n, s).unbind(0)
                self.sg = sg.unsqueeze(1)
                return
            self.m = m.detach().reshape(-1).to(acc, copy=True)
            self.n = n.detach().reshape(-1).to(acc, copy=True)
            self.sg = (self.m / self.n * s)[:, None]
            self.s_over_n = torch.reciprocal(self.n).mul_(s)

    @property
    def dtype(self) -> torch.dtype:
        return self.n.dtype


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _tail_vectors_kernel_applies(m: torch.Tensor, n: torch.Tensor) -> bool:
    # plain tensors only: a subclass (FSDP2's DTensor, a functorch wrapper, dynamo's fakes) has no
    # storage of its own to hand a kernel; the torch ops handle those
    if type(m) not in _PLAIN_TENSORS or type(n) not in _PLAIN_TENSORS or _functorch_active() \
            or torch.compiler.is_compiling():
        return False
    return _fused._interpreting() or (n.is_cuda and _TAIL_KERNEL_ON_CUDA)


_TAIL_VECTORS_BLOCK = 1024


def _launch_tail_vectors(m: torch.Tensor, n: torch.Tensor, s: float) -> torch.Tensor:
    """[4, d_out] fp32 rows ``m``, ``n``, ``s·m/n``, ``s/n``: one launch (what :class:`TailVectors` holds)."""
    m1, n1 = _fused._vec(m.detach()), _fused._vec(n.detach())
    d_out = n1.numel()
    out = torch.empty((4, d_out), dtype=torch.float32, device=n1.device)
    if d_out == 0:
        return out
    kernel = _tail_vectors_kernel()
    grid = (_fused._cdiv(d_out, _TAIL_VECTORS_BLOCK), 1, 1)
    args, consts = (m1, n1, out, d_out, float(s)), dict(BLOCK=_TAIL_VECTORS_BLOCK)
    with _fused._on_device(n1):
        _fused._launch_config(kernel, ("tail_vectors",), grid, args, {}, consts)
    return out


def _tail_vectors_kernel():
    mode = _fused._interpreting()
    if mode not in _tail_vectors_kernels:
        _fused._load_triton()
        triton, tl = _fused.triton, _fused.tl

        @triton.jit
        def _tail_vectors_fwd_kernel(m_ptr, n_ptr, out_ptr, d_out, s, BLOCK: tl.constexpr):
            # the arithmetic of TailVectors' torch ops, in fp32: sg = (m / n)·s, s/n = (1 / n)·s
            cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = cols < d_out
            m = tl.load(m_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            n = tl.load(n_ptr + cols, mask=mask, other=1.0).to(tl.float32)
            tl.store(out_ptr + cols, m, mask=mask)
            tl.store(out_ptr + d_out + cols, n, mask=mask)
            tl.store(out_ptr + 2 * d_out + cols, tl.div_rn(m, n) * s, mask=mask)
            tl.store(out_ptr + 3 * d_out + cols, tl.div_rn(tl.full([BLOCK], 1.0, tl.float32), n) * s, mask=mask)

        _tail_vectors_kernels[mode] = _tail_vectors_fwd_kernel
    return _tail_vectors_kernels[mode]


_tail_vectors_kernels: dict = {}


def tail_vectors(m: torch.Tensor, n: torch.Tensor, s: float) -> TailVectors:
    """The :class:`TailVectors` of ``m``, ``n`` and ``s`` (what :class:`FusedDoraLoraB` takes).

    Raises:
        TypeError, ValueError: ``m`` or ``n`` not a float tensor, their element counts or devices
            differing, or ``s`` not a Python number.
    """
    fn = "tail_vectors"
    _fused._check_tensor(fn, "m", m)
    _fused._check_tensor(fn, "n", n)
    _fused._check_number(fn, "s", s)
    _fused._check_numel(fn, "m", m, n.numel())
    _fused._check_devices(fn, [("m", m), ("n", n)])
    return TailVectors(m, n, s)


class FusedDoraLoraB(torch.autograd.Function):
    """``apply(base, ax, B, m, tail, s, bias)`` -> ``out`` [..., d_out] in ``base.dtype``.

    ``ax`` [..., r] is ``A·x`` in the compute dtype; ``B`` [d_out, r] is ``lora_B``'s weight (any
    float dtype: multiplied in ``ax``'s, as autocast does, and given its gradient in its own);
    ``m`` [d_out] is the magnitude (only its gradient flows through here: its value comes in
    ``tail``, the :func:`tail_vectors` of ``m``, ``n`` and ``s``); ``bias`` is optional [d_out].
    Unvalidated: the DoRA layer builds the inputs.

    The step is often host-bound (many small layers): the forward saves at most three tensors and
    the backward is a handful of host ops.
    """

    @staticmethod
    def forward(ctx, base, ax, B, m, tail, s, bias):
        out = _forward(base, ax, B, tail, s, bias)
        ctx.s, ctx.tail = s, tail  # constants: kept as they are, outside save_for_backward's hooks
        ctx.m_meta = (m.shape, m.dtype)
        ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
        # base is kept only for ∂m (a frozen magnitude saves no [T, d_out] tensor at all)
        ctx.save_for_backward(base if ctx.needs_input_grad[3] else None, ax, B)
        return out

    @staticmethod
    def backward(ctx, dy):
        base, ax, B = ctx.saved_tensors
        tail = ctx.tail
        need_base, need_ax, need_B, need_m = ctx.needs_input_grad[:4]
        need_bias = ctx.bias_meta is not None and ctx.needs_input_grad[6]
        d_out, r = B.shape
        dy_rows = _launch_rows(dy, d_out)  # contiguous (a copy only if dy was not)
        dy2 = dy_rows if dy_rows.dim() == 2 else dy_rows.view(-1, d_out)  # for the GEMMs
        acc = tail.dtype
        d_base = pdm = d_m = d_bias = grads_ax = grads_B = None
        if need_base or need_m or need_bias:
            # one pass over dy (and base): ∂base = g ⊙ dy, per-chunk Σ_t dy·base, Σ_t dy
            d_base, _, pdm, d_bias = _launch_compose_bwd(
                dy_rows, _launch_rows(base, d_out) if need_m else None, tail.m, tail.n, ctx.s,
                saved_is_out=False, need_dbase=need_base, need_dlora=False, need_dm=need_m, need_dbias=need_bias,
                lora_dtype=dy.dtype, acc_dtype=acc, reduce_dm=False)
        if need_B or need_m or need_ax:
            P = _mm_acc(dy2.t(), _as(_rows(ax, r), dy2.dtype), acc) if (need_B or need_m) else None
            d_m, grads_B, B_scaled = _tail_backward(pdm, P, B, tail, dy2.dtype, need_B, need_ax, consume_P=True)
            if need_ax:
                grads_ax = _as(torch.mm(dy2, B_scaled), ax.dtype).view(ax.shape)
        return (
            _shaped(d_base, dy.shape) if need_base else None,
            grads_ax,
            grads_B,
            _as(d_m, ctx.m_meta[1]).view(ctx.m_meta[0]) if need_m else None,
            None,
            None,
            _as(d_bias, ctx.bias_meta[1]).view(ctx.bias_meta[0]) if need_bias else None,
        )


# ``Function.apply`` is a Python wrapper (default-argument binding, functorch's dead-wrapper unwrap)
# around the C entry: a few µs per forward on a host-bound step. In eager, outside functorch
# transforms, the C entry is called directly; inside a transform the wrapper is required (it routes
# to custom_function_call), and under torch.compile dynamo knows only the wrapper.
try:
    _apply_c = torch._C._FunctionBase.__dict__["apply"].__get__(None, FusedDoraLoraB)
    _functorch_active = torch._C._are_functorch_transforms_active
except (AttributeError, KeyError):  # pragma: no cover - a torch laid out otherwise: the wrapper always
    _apply_c = FusedDoraLoraB.apply

    def _functorch_active() -> bool:
        return False

_compiling = torch.compiler.is_compiling


def _apply(*args):
    if _functorch_active() or _compiling():
        return FusedDoraLoraB.apply(*args)
    return _apply_c(*args)


_TAIL_BLOCKS = {False: dict(BLOCK_D=32, BLOCK_R=64, num_warps=4), True: dict(BLOCK_D=16, BLOCK_R=16)}
# The kernel is checked against its twin under Triton's interpreter (CPU CI) and compiled on an H100
# (tests/test_dora_fused_linear.py: code/results/gpu_tests/host-tests_h100_81b58b0.txt). With direct launches it
# made the Qwen3-VL-8B gradient window ~5% shorter than the twin's seven torch ops, at r=16 and r=384, gradients
# within the run-to-run noise (code/results/diagnostics/window_ab_8b_h100.json). The switch also gates the
# TailVectors kernel (H100: code/results/gpu_tests/gpu-tests_82c9dab.txt; same-host 8B window A/B in
# code/results/diagnostics/ab_8b_r16_0308d8e/).
_TAIL_KERNEL_ON_CUDA = True


def _tail_kernel():
    """The [d_out, r] backward kernel (defined on first use: importing needs only torch)."""
    mode = _fused._interpreting()
    if mode in _tail_kernels:
        return _tail_kernels[mode]
    _fused._load_triton()
    triton, tl = _fused.triton, _fused.tl

    @triton.jit
    def _lora_b_tail_bwd_kernel(
        pdm_ptr, P_ptr, B_ptr, sg_ptr, son_ptr, n_ptr, dm_ptr, dB_ptr, Bs_ptr,
        d_out, r, n_chunks, stride_p, stride_b, stride_db, stride_bs,
        NEED_DM: tl.constexpr, NEED_DB: tl.constexpr, NEED_BS: tl.constexpr,
        ACC: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # A block of rows i: ∂B_i = sg_i·P_i, (sg·B)_i, and ∂m_i = Σ_c pdm_ci / n_i + (s/n_i)·Σ_j B_ij P_ij
        pid = tl.program_id(0)
        rows = (pid * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        rmask = rows < d_out
        sg = tl.load(sg_ptr + rows, mask=rmask, other=0.0).to(ACC)
        cross = tl.zeros([BLOCK_D], dtype=ACC)
        for j0 in range(0, r, BLOCK_R):
            cj = j0 + tl.arange(0, BLOCK_R)
            mj = rmask[:, None] & (cj < r)[None, :]
            Bj = tl.load(B_ptr + rows[:, None] * stride_b + cj[None, :], mask=mj, other=0.0).to(ACC)
            if NEED_BS:
                tl.store(Bs_ptr + rows[:, None] * stride_bs + cj[None, :],
                         (sg[:, None] * Bj).to(Bs_ptr.dtype.element_ty), mask=mj)
            if NEED_DM or NEED_DB:
                # dB may be P itself (consume_P): this program reads each P element before it stores there
                Pj = tl.load(P_ptr + rows[:, None] * stride_p + cj[None, :], mask=mj, other=0.0).to(ACC)
                if NEED_DB:
                    tl.store(dB_ptr + rows[:, None] * stride_db + cj[None, :],
                             (sg[:, None] * Pj).to(dB_ptr.dtype.element_ty), mask=mj)
                if NEED_DM:
                    cross += tl.sum(Bj * Pj, axis=1)
        if NEED_DM:
            base_part = tl.zeros([BLOCK_D], dtype=ACC)
            for c in range(0, n_chunks):
                base_part += tl.load(pdm_ptr + c * d_out + rows, mask=rmask, other=0.0).to(ACC)
            n = tl.load(n_ptr + rows, mask=rmask, other=1.0).to(ACC)
            son = tl.load(son_ptr + rows, mask=rmask, other=0.0).to(ACC)
            if IS_FP64:
                d_m = base_part / n + son * cross
            else:
                d_m = tl.div_rn(base_part, n) + son * cross
            tl.store(dm_ptr + rows, d_m, mask=rmask)

    _tail_kernels[mode] = _lora_b_tail_bwd_kernel
    return _lora_b_tail_bwd_kernel


_tail_kernels: dict = {}


def _tail_backward(pdm, P, B, tail: "TailVectors", bs_dtype, need_B: bool, need_Bs: bool, consume_P: bool = False):
    """(∂m or None, ∂B or None, sg ⊙_rows B or None): one launch of the [d_out, r] kernel, or its
    PyTorch twin where the kernels cannot run (a CPU tensor without the interpreter).

    ``consume_P``: the caller gives ``P`` up, so the kernel writes ∂B over it where the dtypes and
    layout match (each element is read before it is overwritten, by the same program): one
    [d_out, r] buffer fewer at the backward's peak (81 MiB at d_out 27648, r 768 in fp32)."""
    need_dm = pdm is not None
    if not _fused._interpreting() and (B.device.type != "cuda" or not _TAIL_KERNEL_ON_CUDA):
        return lora_b_tail_backward_reference(pdm, P, B, tail.sg, tail.s_over_n, tail.n, bs_dtype,
                                              need_dB=need_B, need_Bs=need_Bs)
    d_out, r = B.shape
    acc = tail.dtype
    dev = B.device
    d_m = torch.empty(d_out, dtype=acc, device=dev) if need_dm else None
    if need_B and consume_P and P is not None and P.dtype == B.dtype and P.is_contiguous():
        dB = P
    else:
        dB = torch.empty((d_out, r), dtype=B.dtype, device=dev) if need_B else None
    Bs = torch.empty((d_out, r), dtype=bs_dtype, device=dev) if need_Bs else None
    if d_out == 0 or r == 0:
        if need_dm:  # no LoRA part: the base part alone
            d_m.copy_(pdm.sum(0) / tail.n)
        return d_m, dB, Bs
    B2 = B if B.stride(1) == 1 else B.contiguous()
    P2 = P if P is not None else B2  # never read without ∂m or ∂B
    dummy = tail.n
    args = (pdm if need_dm else dummy, P2, B2, tail.sg, tail.s_over_n, tail.n,
            d_m if need_dm else dummy, dB if need_B else B2, Bs if need_Bs else B2,
            d_out, r, pdm.shape[0] if need_dm else 0, P2.stride(0), B2.stride(0),
            dB.stride(0) if need_B else 0, Bs.stride(0) if need_Bs else 0)
    kernel = _tail_kernel()  # binds triton / tl
    interp = _fused._interpreting()
    is64 = acc == torch.float64
    consts = dict(NEED_DM=need_dm, NEED_DB=bool(need_B), NEED_BS=bool(need_Bs),
                  ACC=_fused.tl.float64 if is64 else _fused.tl.float32, IS_FP64=is64)
    blocks = _TAIL_BLOCKS[interp]
    grid = (_fused._cdiv(d_out, blocks["BLOCK_D"]), 1, 1)
    with _fused._on_device(B):
        _fused._launch_config(kernel, ("lora_b_tail_bwd", need_dm, bool(need_B), bool(need_Bs), is64), grid, args,
                              consts, blocks)
    return d_m, dB, Bs


def _lora_out(ax: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``ax·Bᵀ`` in ``ax``'s dtype. Under autocast to that dtype, ``F.linear`` casts ``B`` itself
    (one op instead of cast + transpose + matmul, and autocast's cast cache applies); otherwise
    ``B`` is cast explicitly."""
    if B.dtype != ax.dtype:
        device_type = ax.device.type
        if not (B.dtype in (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves fp64 alone
                and torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == ax.dtype):
            B = B.to(ax.dtype)
    return torch.nn.functional.linear(ax, B)


def _lora_b_fwd_kernel():
    """The forward kernel: ``out = g ⊙ (base + s·ax·Bᵀ) + bias`` per [BLOCK_T, BLOCK_D] tile, the
    LoRA product accumulated in fp32 over r and never written out (defined once per mode)."""
    triton, tl = _fused.triton, _fused.tl

    @triton.jit
    def _lora_b_compose_fwd_kernel(
        base_ptr, ax_ptr, B_ptr, m_ptr, n_ptr, bias_ptr, out_ptr,
        T, d_out, r, stride_base, stride_ax, stride_b, stride_out, s, T_BUCKET,
        HAS_BIAS: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, PREFETCH_BASE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = rows < T
        cmask = cols < d_out
        mask = rmask[:, None] & cmask[None, :]
        base_ptrs = base_ptr + rows[:, None] * stride_base + cols[None, :]
        if PREFETCH_BASE:  # issued before the loop over r, so its latency hides behind the products
            b = tl.load(base_ptrs, mask=mask, other=0.0)
        lora = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, r, BLOCK_R):
            ks = k0 + tl.arange(0, BLOCK_R)
            kmask = ks < r
            a = tl.load(ax_ptr + rows[:, None] * stride_ax + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            bt = tl.load(B_ptr + cols[None, :] * stride_b + ks[:, None], mask=kmask[:, None] & cmask[None, :],
                         other=0.0)
            # B multiplies in ax's dtype, as autocast's linear would: rounded there first
            bt = bt.to(ax_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            lora = tl.dot(a.to(DOT), bt.to(DOT), lora, input_precision=DOT_PRECISION)
        m = tl.load(m_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        n = tl.load(n_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
        g = tl.div_rn(m, n)
        if not PREFETCH_BASE:
            b = tl.load(base_ptrs, mask=mask, other=0.0)
        out = g[None, :] * (b.to(tl.float32) + s * lora)
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    return _lora_b_compose_fwd_kernel


_fused.register_kernel("lora_b_fwd", _lora_b_fwd_kernel, ["d_out", "r", "T_BUCKET", "HAS_BIAS"],
                       _fused.launch.lora_b_fwd_configs, _fused.launch.prune_lora_b_fwd)
_GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HALF_DTYPES = (torch.bfloat16, torch.float16)


# The forward as one kernel instead of cuBLAS's lora_B GEMM then the compose kernel: one launch and
# no [T, d_out] lora tensor written and read back. On a host-bound step each launch counts (H100 host,
# code/results/diagnostics/host_probe_h100_30619ed_cprofile.json: ~100 µs per F.linear, ~80 µs per
# direct launch). GPU tests: code/results/gpu_tests/gpu-tests-onefwd_4d1d6ca.txt, gpu-tests_f14083a.txt.
_ONE_KERNEL_FORWARD = True
# From this rank the kernel reads B already in the activation dtype (one cast per forward, the
# rounding the kernel would do anyway: bit-identical output). Converting an fp32 B tile inside the
# loop over r stalls the kernel's pipelined loads: on the H100 (T=4096, CUDA-graph replay) it took
# 1.11-1.21x the pair's time at r=384 and 1.5x at r=768 with fp32 B; with B cast first, 0.75x and 0.90x
# (d_out 4096 and 27648; code/results/diagnostics/lora_b_fwd_b16_h100.json). At r=16 the two read
# alike (34.7 vs 34.2 µs), so small ranks skip the cast's launch.
_CAST_B_MIN_R = 64
# Up to this rank. Cast included, the kernel takes 0.62-0.67x the pair's time at r=16..128, 0.81-0.83x
# at r=384 and 0.97-1.00x at r=768 (d_out 4096..8192; diagnostics/kernel_sweep_launcher_h100.json),
# where it still saves a launch; past r=768 the pair's cuBLAS GEMM would pull ahead.
_ONE_KERNEL_MAX_R = 768


def _fused_forward_applies(base, ax, B, tail) -> bool:
    """The one-kernel forward takes bf16/fp16 activations (tensor-core products) with fp32 tail
    vectors, up to rank ``_ONE_KERNEL_MAX_R``. fp32 activations keep cuBLAS's GEMM + the compose: the
    kernel handles them (exact fp32 products, tested), but its fp32 dot runs on FMA units and was not
    timed against cuBLAS's SGEMM; fp64 (tests, gradcheck) keeps the pair too."""
    return (_ONE_KERNEL_FORWARD and ax.dtype in _HALF_DTYPES and B.shape[1] <= _ONE_KERNEL_MAX_R
            and B.dtype in _GEMM_DTYPES and base.dtype in _GEMM_DTYPES and tail.dtype == torch.float32)


def _launch_lora_b_fwd(base, ax, B, tail, s, bias):
    d_out, r = B.shape
    base2, ax2 = _launch_rows(base, d_out), _launch_rows(ax, r)
    _fused._check_runnable(base2)
    T = _fused._n_rows(base2)
    out = torch.empty(base2.shape, dtype=base.dtype, device=base.device)
    if T == 0 or d_out == 0:
        return out
    B2 = B if B.stride(1) == 1 else B.contiguous()
    if B2.dtype != ax2.dtype and r >= _CAST_B_MIN_R:
        B2 = B2.to(ax2.dtype)
    interp = _fused._interpreting()
    _fused._kernels()  # binds triton / tl
    tl = _fused.tl
    # bf16/fp16 products are exact in fp32 and summed there (tensor cores); fp32 activations multiply in
    # full fp32 ("ieee"), as torch's matmul does with TF32 off. The interpreter multiplies bf16 as raw
    # integers, so there the dot runs in fp32 on the rounded values. (A function of ax's dtype and the
    # mode, both in the tuning key already.)
    dot = tl.float32 if interp or ax.dtype == torch.float32 else (
        tl.bfloat16 if ax.dtype == torch.bfloat16 else tl.float16)
    vec = _fused._vec
    m1 = vec(tail.m)
    b1 = vec(bias) if bias is not None else m1
    t_bucket = _fused._t_bucket(T)
    args = (base2, ax2, B2, m1, vec(tail.n), b1, out, T, d_out, r, _fused._row_stride(base2),
            _fused._row_stride(ax2), B2.stride(0), _fused._row_stride(out), float(s), t_bucket)
    consts = dict(HAS_BIAS=bias is not None, DOT=dot, DOT_PRECISION="ieee", **_fused._OPTS)
    cdiv = _fused._cdiv
    with _fused._on_device(base2):
        _fused._launch_tuned(
            "lora_b_fwd", lambda META: (cdiv(T, META["BLOCK_T"]), cdiv(d_out, META["BLOCK_D"])), args, consts,
            (d_out, r, t_bucket, bias is not None, base2.dtype, ax2.dtype, B2.dtype, out.dtype, b1.dtype))
    return out


def _forward(base, ax, B, tail, s, bias):
    if _fused_forward_applies(base, ax, B, tail):
        return _shaped(_launch_lora_b_fwd(base, ax, B, tail, s, bias), base.shape)
    d_out = base.shape[-1]
    lora = _lora_out(ax, B)
    out, _ = _launch_compose_fwd(_launch_rows(base, d_out), _launch_rows(lora, d_out), tail.m, tail.n, s, bias, False)
    return _shaped(out, base.shape)


def compose_lora_b(base: torch.Tensor, ax: torch.Tensor, B: torch.Tensor, m: torch.Tensor, n: torch.Tensor,
                   s: float, bias: Optional[torch.Tensor] = None, tail: Optional[TailVectors] = None) -> torch.Tensor:
    """``g ⊙ (base + s·ax·Bᵀ) + bias``, ``g = m / n``, through :class:`FusedDoraLoraB`.

    Args:
        base: the base output without bias [..., d_out].
        ax: ``A·x`` [..., r] (the same leading shape as ``base``).
        B: ``lora_B``'s weight [d_out, r] (multiplied in ``ax``'s dtype).
        m, n: magnitude and row norm [d_out]; ``n`` is a constant (no gradient).
        s: the scaling, a Python number.
        bias: optional [d_out].
        tail: precomputed :func:`tail_vectors` of ``m``, ``n``, ``s`` (computed here when None).

    Raises:
        TypeError, ValueError: naming the argument, its shape, dtype or device, and what is expected.
    """
    fn = "compose_lora_b"
    for name, t in (("base", base), ("ax", ax), ("B", B), ("m", m), ("n", n)):
        _fused._check_tensor(fn, name, t)
    if bias is not None:
        _fused._check_tensor(fn, "bias", bias)
    _fused._check_number(fn, "s", s)
    if B.dim() != 2:
        raise ValueError(f"{fn}: `B` must be [d_out, r], got shape {tuple(B.shape)}")
    d_out, r = B.shape
    if base.dim() < 1 or base.shape[-1] != d_out:
        raise ValueError(f"{fn}: `base` has shape {tuple(base.shape)}; expected [..., d_out={d_out}] (B's rows)")
    if ax.shape[:-1] != base.shape[:-1] or ax.shape[-1:] != (r,):
        raise ValueError(f"{fn}: `ax` has shape {tuple(ax.shape)}; expected {tuple(base.shape[:-1]) + (r,)} "
                         f"(base's leading dims, r={r})")
    for name, t in (("m", m), ("n", n), ("bias", bias)):
        if t is not None:
            _fused._check_numel(fn, name, t, d_out)
    _fused._check_devices(fn, [("base", base), ("ax", ax), ("B", B), ("m", m), ("n", n), ("bias", bias)])
    if tail is not None and (not isinstance(tail, TailVectors) or tail.n.numel() != d_out):
        raise ValueError(f"{fn}: `tail` must be tail_vectors(m, n, s) for d_out={d_out}, got {type(tail).__name__}")
    return compose_lora_b_trusted(base, ax, B, m, n, s, bias, tail)


def compose_lora_b_trusted(base, ax, B, m, n, s, bias=None, tail=None) -> torch.Tensor:
    """:func:`compose_lora_b` without input validation (the DoRA layer, on every forward). Without
    autograd (no grad mode, or nothing requires grad) the Function is skipped: same kernels, less
    host time."""
    tail = tail if tail is not None else TailVectors(m, n, s)
    s = float(s)
    if torch.is_grad_enabled() and (
        base.requires_grad or ax.requires_grad or B.requires_grad or m.requires_grad
        or (bias is not None and bias.requires_grad)
    ):
        return _apply(base, ax, B, m, tail, s, bias)
    return _forward(base, ax, B, tail, s, bias)
