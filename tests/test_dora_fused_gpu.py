"""GPU tests of the fused DoRA kernels at production shapes (compiled Triton, not the interpreter).

Shapes: T = 4096 tokens, d_out from the (d_in, d_out) pairs of the paper's
models, r up to 768. Kernels are checked against their twins and fp64.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from dorafactors import dora_fused as F  # noqa: E402
from dorafactors.dora_fused_naive import (  # noqa: E402
    dora_compose_backward_reference,
    dora_compose_reference,
    dora_norm_assembly_reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="GPU tests run compiled kernels"),
]

T = 4096
S = 2.0
D_OUTS = [4096, 8192, 27648, 5120]  # from (d_in, d_out) in {(4096,4096), (8192,8192), (5120,27648), (27648,5120)}
RANKS = [16, 128, 384, 768]


def _rel_err(actual, expected):
    a, e = actual.double(), expected.double()
    assert not torch.isnan(a).any(), "NaN in kernel output"
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item(), (a - e).abs().max().item()


def _compose_inputs(d_out, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.randn(T, d_out, device="cuda", generator=gen).to(dtype)
    lora = (0.1 * torch.randn(T, d_out, device="cuda", generator=gen)).to(dtype)
    m = torch.rand(d_out, device="cuda", generator=gen) + 0.5
    n = m * (1 + 0.01 * torch.randn(d_out, device="cuda", generator=gen))  # near-unity g
    return base, lora, m, n


@pytest.mark.parametrize("d_out", D_OUTS, ids=lambda d: f"T{T}-dout{d}-bf16")
def test_compose_forward_production(d_out):
    base, lora, m, n = _compose_inputs(d_out)
    bias = torch.randn(d_out, device="cuda").to(torch.bfloat16)
    out = torch.full_like(base, float("nan"))
    v = torch.full_like(base, float("nan"))
    F._launch_compose_fwd(base, lora, m, n, S, bias, True, out=out, v=v)
    twin = dora_compose_reference(base, lora, m, n, S, bias)
    # Same fp32 math, one rounding each: at most one bf16 ulp apart.
    assert ((out.float() - twin.float()).abs() <= 2**-7 * twin.float().abs() + 1e-6).all()
    exact = (m.double() / n.double()) * (base.double() + S * lora.double()) + bias.double()
    rel, _ = _rel_err(out, exact)
    assert rel < 4e-3
    rel_v, _ = _rel_err(v, base.double() + S * lora.double())
    assert rel_v < 4e-3


@pytest.mark.parametrize("d_out", D_OUTS, ids=lambda d: f"T{T}-dout{d}-bf16")
@pytest.mark.parametrize("save_out", [False, True], ids=["save-v", "save-out"])
def test_compose_autograd_production(d_out, save_out):
    base, lora, m, n = _compose_inputs(d_out)
    base.requires_grad_()
    lora.requires_grad_()
    m.requires_grad_()
    dy = torch.randn(T, d_out, device="cuda").to(torch.bfloat16)
    out = F.dora_compose(base, lora, m, n, S, save_out_for_mag_grad=save_out)
    d_base, d_lora, d_m = torch.autograd.grad(out, (base, lora, m), dy)
    r_base, r_lora, r_m = dora_compose_backward_reference(dy, base, lora, m, n, S)
    for name, k, r in (("d_base", d_base, r_base), ("d_lora", d_lora, r_lora)):
        assert ((k.float() - r.float()).abs() <= 2**-7 * r.float().abs() + 1e-6).all(), name
    v = base.detach().double() + S * lora.detach().double()
    exact_dm = (dy.double() * v).sum(0) / n.double()
    scale = (dy.double() * v).abs().sum(0) / n.double()
    assert ((d_m.double() - exact_dm).abs() <= 1e-2 * scale + 1e-4).all()
    assert ((d_m.double() - r_m.double()).abs() <= 1e-2 * scale + 1e-4).all()


@pytest.mark.parametrize("d_out", D_OUTS)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16], ids=["BG-fp32", "BG-bf16"])
def test_norm_assembly_production(d_out, r, factor_dtype):
    gen = torch.Generator(device="cuda").manual_seed(r)
    d_in = 4096
    A = torch.randn(r, d_in, device="cuda", generator=gen) / d_in**0.5
    B = 0.02 * torch.randn(d_out, r, device="cuda", generator=gen)
    W = torch.randn(d_out, d_in, device="cuda", generator=gen).to(torch.bfloat16) / d_in**0.5
    base_sq = W.float().pow(2).sum(1)
    U = (W @ A.to(torch.bfloat16).T)  # bf16, as the caller computes it
    G = A @ A.T
    G = ((G + G.T) / 2).to(factor_dtype)
    B = B.to(factor_dtype)
    m = torch.rand(d_out, device="cuda", generator=gen) + 0.5
    n, g = F.dora_norm_assembly(base_sq, U, B, G, S, m, 1e-6)
    n_t, _ = dora_norm_assembly_reference(base_sq, U, B, G, S, m, 1e-6)
    Bd = B.double()
    nsq = base_sq.double() + 2 * S * (Bd * U.double()).sum(1) + S * S * ((Bd @ G.double()) * Bd).sum(1)
    n_e = nsq.clamp_min(0).sqrt().clamp_min(1e-6)
    assert not torch.isnan(n).any()
    # 3xTF32 (fp32 factors) or exact bf16 products (bf16 factors), fp32 sums.
    assert ((n.double() - n_e).abs() <= 1e-5 * n_e).all()
    assert ((n_t.double() - n_e).abs() <= 1e-4 * n_e).all()
    torch.testing.assert_close(g, m / n, rtol=1e-6, atol=0)


def test_torch_compile_inductor_fullgraph():
    base, lora, m, n = _compose_inputs(4096)
    base.requires_grad_()
    m.requires_grad_()

    def fn(x, y, mag):
        return F.dora_compose(x, y, mag, n, S).float().square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    y_c = compiled(base, lora, m)
    g_c = torch.autograd.grad(y_c, (base, m))
    y_e = fn(base, lora, m)
    g_e = torch.autograd.grad(y_e, (base, m))
    torch.testing.assert_close(y_c, y_e)
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e)


def test_gradcheck_fp64_cuda():
    gen = torch.Generator(device="cuda").manual_seed(1)
    kw = dict(dtype=torch.float64, device="cuda")
    base = torch.randn(5, 33, generator=gen, **kw).requires_grad_()
    lora = torch.randn(5, 33, generator=gen, **kw).requires_grad_()
    m = (torch.rand(33, generator=gen, **kw) + 0.5).requires_grad_()
    n = torch.rand(33, generator=gen, **kw) + 0.5
    bias = torch.randn(33, generator=gen, **kw).requires_grad_()
    assert torch.autograd.gradcheck(lambda b, l, m_, bi: F.dora_compose(b, l, m_, n, S, bi), (base, lora, m, bias))


def _launch_all(base, lora, m, n, dy, B, U, G, base_sq):
    """Every kernel once, into outputs poisoned with NaN (an unwritten element shows)."""
    def nan(like, dtype=None):
        return torch.full_like(like, float("nan"), dtype=dtype or like.dtype)

    out, v = F._launch_compose_fwd(base, lora, m, n, S, None, True, out=nan(base), v=nan(base, torch.float32))
    d_base, d_lora, d_m, _ = F._launch_compose_bwd(
        dy, v, m, n, S, saved_is_out=False, need_dbase=True, need_dlora=True, need_dm=True, need_dbias=False,
        lora_dtype=lora.dtype, acc_dtype=torch.float32, d_base=nan(dy), d_lora=nan(lora))
    n2, g2 = F._launch_norm_assembly(base_sq, U, B, G, S, m, 1e-6, n_out=nan(m), g_out=nan(m))
    return [out, v, d_base, d_lora, d_m, n2, g2]


@pytest.mark.parametrize("tokens", [4096, 333], ids=["T4096", "T333-ragged"])
def test_direct_launch_matches_jit(tokens, monkeypatch):
    """Launching the kept binary directly gives bit-identical results to Triton's JIT dispatch,
    also for a pointer off 16-byte alignment (a different binary) and a new token count."""
    d_out, r = 5120, 64
    gen = torch.Generator(device="cuda").manual_seed(tokens)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    # +1 element: every [T, d_out] pointer is 2 bytes off alignment in the second set
    flat = rnd(4 * tokens * d_out + 1)
    aligned = [flat[i * tokens * d_out:(i + 1) * tokens * d_out].view(tokens, d_out) for i in range(3)]
    shifted = [flat[1 + i * tokens * d_out:1 + (i + 1) * tokens * d_out].view(tokens, d_out) for i in range(3)]
    m = torch.rand(d_out, device="cuda", generator=gen) + 0.5
    n = m * (1 + 0.01 * torch.randn(d_out, device="cuda", generator=gen))
    B, U, G = rnd(d_out, r), rnd(d_out, r), rnd(r, r)
    G = (G @ G.t()).contiguous()
    base_sq = torch.rand(d_out, device="cuda", generator=gen) * d_out
    for base, lora, dy in (aligned, shifted):
        monkeypatch.setattr(F.launch, "_DIRECT_LAUNCH", False)
        expected = _launch_all(base, lora, m, n, dy, B, U, G, base_sq)
        monkeypatch.setattr(F.launch, "_DIRECT_LAUNCH", True)
        before = len(F.launch._direct_cache)
        _launch_all(base, lora, m, n, dy, B, U, G, base_sq)  # first direct call: through the JIT, kept
        assert len(F.launch._direct_cache) > before, "no binary was kept for direct launches"
        assert all(torch.isfinite(t).all() for t in expected), "an output element was left unwritten"
        got = _launch_all(base, lora, m, n, dy, B, U, G, base_sq)  # direct
        for name, a, e in zip(("out", "v", "d_base", "d_lora", "d_m", "n", "g"), got, expected):
            assert torch.equal(a, e), f"{name}: direct launch differs from the JIT launch"


@pytest.mark.parametrize("d_out", D_OUTS, ids=lambda d: f"T{T}-dout{d}")
@pytest.mark.parametrize("r", RANKS)
def test_lora_b_forward_kernel_production(d_out, r, monkeypatch):
    """The one-kernel forward of the fused linear (lora_B's GEMM, compose in its epilogue) at production
    shapes, bf16 activations with PEFT's fp32 B, into a NaN-poisoned output: against its twin and fp64,
    and a direct launch of the kept binary bit-identical to the JIT's."""
    from dorafactors import dora_fused_linear as FL
    from dorafactors.dora_fused_naive import lora_b_compose_reference

    gen = torch.Generator(device="cuda").manual_seed(d_out + r)
    base = torch.randn(T, d_out, device="cuda", generator=gen).bfloat16()
    ax = torch.randn(T, r, device="cuda", generator=gen).bfloat16()
    B = torch.randn(d_out, r, device="cuda", generator=gen) * r ** -0.5
    m = torch.rand(d_out, device="cuda", generator=gen) + 0.5
    n = m * (1 + 0.05 * torch.randn(d_out, device="cuda", generator=gen))
    bias = torch.randn(d_out, device="cuda", generator=gen).bfloat16()
    tail = FL.tail_vectors(m, n, S)
    real_empty = torch.empty

    def poisoned_empty(*a, **k):  # floating outputs only: the autotuner's benchmark allocates int buffers
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(FL, "_ONE_KERNEL_MAX_R", 1 << 20)  # the kernel at every rank, past the dispatch's cut
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    monkeypatch.setattr(F.launch, "_DIRECT_LAUNCH", False)
    out = FL._forward(base, ax, B, tail, S, bias)
    monkeypatch.setattr(F.launch, "_DIRECT_LAUNCH", True)
    direct = [FL._forward(base, ax, B, tail, S, bias) for _ in range(2)][-1]
    monkeypatch.setattr(torch, "empty", real_empty)
    assert torch.equal(out, direct), "direct launch differs from the JIT launch"
    rel, _ = _rel_err(out, lora_b_compose_reference(base, ax, B, m, n, S, bias))
    assert rel < 4e-3, f"vs twin: rel {rel:.3g}"
    g = m.double() / n.double()
    exact = g * (base.double() + S * (ax.double() @ B.bfloat16().double().t())) + bias.double()
    rel64, _ = _rel_err(out, exact)
    assert rel64 < 4e-3, f"vs fp64: rel {rel64:.3g}"
    # the pair it replaces (cuBLAS GEMM rounded to bf16, then the compose) is no closer to fp64
    monkeypatch.setattr(FL, "_ONE_KERNEL_FORWARD", False)
    rel64_pair, _ = _rel_err(FL._forward(base, ax, B, tail, S, bias), exact)
    assert rel64 <= rel64_pair * 1.01, f"one kernel {rel64:.3g} vs the pair's {rel64_pair:.3g} against fp64"
