"""Pure-PyTorch twins of the fused DoRA kernels in ``dora_fused``.

Each function here has the same signature and the same numerics contract as
its fused counterpart: inputs are upcast to fp32 (fp64 when any input is
fp64), the arithmetic runs in that precision, and results are rounded once to
the output dtype. Tests and benchmarks import these as the ground truth the
kernels must match; they are also the CPU fallback a dispatcher can use.

Symbols follow DESIGN.md: ``W`` frozen weight, ``A`` [r, d_in], ``B``
[d_out, r], ``U = W·Aᵀ`` [d_out, r], ``G = A·Aᵀ`` [r, r], ``s`` scaling,
``m`` magnitude [d_out], ``n`` row norm [d_out] (a constant in backward),
``g = m / n``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "compute_dtype",
    "dora_compose_reference",
    "dora_compose_backward_reference",
    "dora_norm_assembly_reference",
    "lora_b_compose_reference",
    "lora_b_tail_backward_reference",
]


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 when any given tensor is fp64, else fp32: the kernels' accumulation dtype."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def dora_compose_reference(
    base: torch.Tensor,
    lora: torch.Tensor,
    m: torch.Tensor,
    n: torch.Tensor,
    s: float,
    bias: Optional[torch.Tensor] = None,
    *,
    save_out_for_mag_grad: bool = False,
) -> torch.Tensor:
    """``out = g ⊙ (base + s·lora) + bias`` with ``g = m / n``, differentiable.

    base, lora: [..., d_out]; m, n, bias: [d_out]. Computes in fp32 (fp64 if
    any input is fp64) and rounds once to ``base.dtype``. ``n`` is detached
    (the DoRA paper treats the row norm as a constant in backward).
    ``save_out_for_mag_grad`` only selects what the fused path saves for
    backward; it does not change the result and is ignored here.
    """
    del save_out_for_mag_grad
    acc = compute_dtype(base, lora, m, n, bias)
    d_out = base.shape[-1]
    g = m.reshape(d_out).to(acc) / n.detach().reshape(d_out).to(acc)
    v = base.to(acc) + s * lora.to(acc)
    out = g * v
    if bias is not None:
        out = out + bias.reshape(d_out).to(acc)
    return out.to(base.dtype)


def dora_compose_backward_reference(
    dy: torch.Tensor,
    base: torch.Tensor,
    lora: torch.Tensor,
    m: torch.Tensor,
    n: torch.Tensor,
    s: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`dora_compose_reference` for an upstream gradient ``dy``.

    Returns ``(d_base, d_lora, d_m)``: ``d_base = g ⊙ dy`` [..., d_out] in
    ``base.dtype``, ``d_lora = s·g ⊙ dy`` in ``lora.dtype``, and
    ``d_m_i = Σ_t dy_ti·(base_ti + s·lora_ti) / n_i`` [d_out] in ``m.dtype``,
    reduced over all leading dims in fp32. (``d_bias = Σ_t dy`` is omitted.)
    """
    acc = compute_dtype(dy, base, lora, m, n)
    d_out = base.shape[-1]
    m_a = m.detach().reshape(d_out).to(acc)
    n_a = n.detach().reshape(d_out).to(acc)
    g = m_a / n_a
    dy_a = dy.to(acc)
    d_base = (g * dy_a).to(base.dtype)
    d_lora = ((s * g) * dy_a).to(lora.dtype)
    v = base.detach().to(acc) + s * lora.detach().to(acc)
    d_m = ((dy_a * v).reshape(-1, d_out).sum(0) / n_a).to(m.dtype).reshape(m.shape)
    return d_base, d_lora, d_m


def dora_norm_assembly_reference(
    base_sq: torch.Tensor,
    U: torch.Tensor,
    B: torch.Tensor,
    G: torch.Tensor,
    s: float,
    m: torch.Tensor,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row norm of ``W + s·B·A`` from its factored terms, and ``g = m / n``.

    ``n_i = max(sqrt(max(‖W_i‖² + 2s·Σ_j B_ij U_ij + s²·Σ_j (B G)_ij B_ij, 0)), eps)``
    with base_sq [d_out] (= ‖W_i‖²), U [d_out, r], B [d_out, r], G [r, r],
    m [d_out]. Returns ``(n, g)``, both [d_out] fp32 (fp64 if any input is
    fp64), detached.
    """
    acc = compute_dtype(base_sq, U, B, G, m)
    d_out = B.shape[0]
    with torch.no_grad():
        Ba = B.to(acc)
        cross = (Ba * U.to(acc)).sum(-1)
        gram = ((Ba @ G.to(acc)) * Ba).sum(-1)
        nsq = base_sq.reshape(d_out).to(acc) + (2.0 * s) * cross + (s * s) * gram
        n = nsq.clamp_min(0.0).sqrt().clamp_min(eps)
        g = m.detach().reshape(d_out).to(acc) / n
    return n, g


def lora_b_tail_backward_reference(
    pdm: Optional[torch.Tensor], P: torch.Tensor, B: torch.Tensor, sg: torch.Tensor, s_over_n: torch.Tensor,
    n: torch.Tensor, bs_dtype: torch.dtype, *, need_dB: bool = True, need_Bs: bool = True,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The fused linear tail's small backward pass over [d_out, r] (twin of its Triton kernel).

    ``pdm`` [C, d_out]: per-chunk sums ``Σ_t dy·base`` (None: no ∂m); ``P = dyᵀ·ax`` [d_out, r] in
    the accumulation dtype; ``sg = s·m/n``, ``s_over_n = s/n``, ``n`` [d_out]. Returns
    ``∂m = Σ_c pdm / n + (s/n)·Σ_j B_ij P_ij`` (accumulation dtype), ``∂B = sg ⊙_rows P`` in
    ``B.dtype`` and ``sg ⊙_rows B`` in ``bs_dtype`` (what ∂(A·x) multiplies ``dy`` by); the last two
    only when asked for (else None).
    """
    def as_(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # no op where the dtype already fits
        return t if t.dtype == dtype else t.to(dtype)

    acc = P.dtype if P is not None else sg.dtype  # no P when neither ∂m nor ∂B is asked for
    sg_col = as_(sg.reshape(-1, 1), acc)
    B_acc = as_(B, acc)
    d_m = None
    if pdm is not None:
        d_m = torch.addcmul(as_(pdm, acc).sum(0).div_(as_(n, acc)), torch.linalg.vecdot(P, B_acc), as_(s_over_n, acc))
    dB = as_(P * sg_col, B.dtype) if need_dB else None
    return d_m, dB, as_(B_acc * sg_col, bs_dtype) if need_Bs else None


def lora_b_compose_reference(
    base: torch.Tensor, ax: torch.Tensor, B: torch.Tensor, m: torch.Tensor, n: torch.Tensor, s: float,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Twin of the fused linear's forward kernel: ``g ⊙ (base + s·ax·Bᵀ) + bias``, ``g = m / n``.

    ``B`` is rounded to ``ax``'s dtype (autocast's rule for the LoRA GEMM), the product is summed in
    fp32 (fp64 for fp64 inputs) and never rounded to the activation dtype; one rounding to
    ``base.dtype`` at the end. No autograd (the kernel's Function owns the backward).
    """
    acc = compute_dtype(base, ax, m, n, bias)
    with torch.no_grad():
        lora = ax.to(acc) @ B.to(ax.dtype).to(acc).t()
        g = m.reshape(-1).to(acc) / n.reshape(-1).to(acc)
        out = g * (base.to(acc) + s * lora)
        if bias is not None:
            out = out + bias.reshape(-1).to(acc)
    return out.to(base.dtype)
