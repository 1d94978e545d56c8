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
saved bytes, and two fewer [T, d_out] passes than saving ``v``.
"""

from typing import Optional

import torch

from .dora_fused import SAVE_NONE, _compose_fwd_impl, _launch_compose_bwd, _rows, compute_dtype

__all__ = ["FusedDoraLoraB", "compose_lora_b", "tail_vectors"]


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` accumulated and returned in ``acc`` (one rounding, as a fp32-output GEMM)."""
    if a.is_cuda and acc == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without mm's out_dtype
            pass
    return torch.mm(a, b).to(acc)


class FusedDoraLoraB(torch.autograd.Function):
    """``apply(base, ax, B, m, n, s, bias, sg, s_over_n)`` -> ``out`` [..., d_out] in ``base.dtype``.

    ``ax`` [..., r] is ``A·x`` in the compute dtype; ``B`` [d_out, r] is ``lora_B``'s weight (any
    float dtype: multiplied in ``ax``'s, as autocast does, and given its gradient in its own);
    ``n`` is a constant; ``bias`` is optional [d_out]; ``sg = s·m/n`` and ``s_over_n = s/n`` are
    fp32 [d_out] (the layer caches them per norm and magnitude). Unvalidated: the DoRA layer
    builds the inputs. The backward is a handful of host ops: the step is often host-bound.
    """

    @staticmethod
    def forward(ctx, base, ax, B, m, n, s, bias, sg, s_over_n):
        B_c = B.to(ax.dtype)
        lora = torch.matmul(ax, B_c.t())
        out, _ = _compose_fwd_impl(base, lora, m, n, s, bias, SAVE_NONE)
        ctx.s = float(s)
        ctx.base_shape, ctx.ax_shape = base.shape, ax.shape
        ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
        # base is kept only for ∂m (a frozen magnitude saves no [T, d_out] tensor at all)
        ctx.save_for_backward(base if ctx.needs_input_grad[3] else None, ax, B, m, n, sg, s_over_n)
        return out

    @staticmethod
    def backward(ctx, dy):
        base, ax, B, m, n, sg, s_over_n = ctx.saved_tensors
        need_base, need_ax, need_B, need_m = ctx.needs_input_grad[:4]
        need_bias = ctx.bias_meta is not None and ctx.needs_input_grad[6]
        d_out, r = B.shape
        dy2 = _rows(dy, d_out)
        acc = sg.dtype
        d_base = d_m = d_bias = grads_ax = grads_B = None
        if need_base or need_m or need_bias:
            # one pass over dy (and base): ∂base = g ⊙ dy, d_m = Σ_t dy·base / n, Σ_t dy
            d_base, _, d_m, d_bias = _launch_compose_bwd(
                dy2, _rows(base, d_out) if need_m else None, m, n, ctx.s, saved_is_out=False,
                need_dbase=need_base, need_dlora=False, need_dm=need_m, need_dbias=need_bias,
                lora_dtype=dy.dtype, acc_dtype=acc)
        B_acc = B.to(acc)
        if need_B or need_m:
            P = _mm_acc(dy2.t(), ax.reshape(-1, r).to(dy2.dtype), acc)  # [d_out, r] = dyᵀ·ax
            if need_m:  # + the LoRA part: s/n · Σ_j B_ij P_ij
                d_m.addcmul_(torch.linalg.vecdot(P, B_acc), s_over_n)
            if need_B:
                grads_B = P.mul_(sg[:, None]).to(B.dtype)
        if need_ax:
            # out of place: B_acc may be the parameter itself
            grads_ax = torch.mm(dy2, torch.mul(B_acc, sg[:, None]).to(dy2.dtype)).to(ax.dtype).view(ctx.ax_shape)
        return (
            d_base.view(ctx.base_shape) if need_base else None,
            grads_ax,
            grads_B,
            d_m.to(m.dtype).view(m.shape) if need_m else None,
            None,
            None,
            d_bias.to(ctx.bias_meta[1]).view(ctx.bias_meta[0]) if need_bias else None,
            None,
            None,
        )


def tail_vectors(m: torch.Tensor, n: torch.Tensor, s: float) -> tuple:
    """``(s·m/n, s/n)`` [d_out] in fp32 (fp64 if ``m`` or ``n`` is), what :class:`FusedDoraLoraB` takes."""
    acc = torch.float64 if torch.float64 in (m.dtype, n.dtype) else torch.float32
    n = n.detach().reshape(-1).to(acc)
    return m.detach().reshape(-1).to(acc) / n * s, torch.full_like(n, float(s)).div_(n)


def compose_lora_b(base: torch.Tensor, ax: torch.Tensor, B: torch.Tensor, m: torch.Tensor, n: torch.Tensor,
                   s: float, bias: Optional[torch.Tensor] = None, tail: Optional[tuple] = None) -> torch.Tensor:
    """``g ⊙ (base + s·ax·Bᵀ) + bias`` through :class:`FusedDoraLoraB` (``n`` detached here);
    ``tail`` passes precomputed :func:`tail_vectors` (computed here when None)."""
    sg, s_over_n = tail if tail is not None else tail_vectors(m, n, s)
    return FusedDoraLoraB.apply(base, ax, B, m, n.detach(), float(s), bias, sg, s_over_n)
