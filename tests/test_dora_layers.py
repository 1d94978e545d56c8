"""Our DoRA layers against PEFT 0.18.0's (the reference) on identical weights: outputs and the
gradients of x, A, B and m, in fp64/fp32 (tight) and bf16/fp16 (error vs fp64 no larger than the
reference's own)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dora_testing import DTYPE_IDS, TOLS, assert_close, ours, rel_rms

# (T, d_in, d_out, r): square, non-square, r > d_in and d_out, r = 1, tiny, ragged
LINEAR_SHAPES = [(7, 16, 24, 4), (5, 12, 9, 20), (4, 8, 8, 1), (3, 1, 5, 2), (2, 3, 1, 3), (63, 97, 41, 16)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _shape_id(shape):
    T, d_in, d_out, r = shape
    return f"T{T}-din{d_in}-dout{d_out}-r{r}"


class FifoLinear(nn.Module):
    """A transformers ``Conv1D``-style layer: weight stored [d_in, d_out]."""

    def __init__(self, d_in, d_out, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1) if bias else None

    def forward(self, x):
        out = x @ self.weight
        return out + self.bias if self.bias is not None else out


def make_linear_case(shape, *, bias=True, fifo=False, scaling=0.7, b_scale=0.3):
    T, d_in, d_out, r = shape
    base = FifoLinear(d_in, d_out, bias) if fifo else nn.Linear(d_in, d_out, bias=bias)
    lora_A = nn.Linear(d_in, r, bias=False)
    lora_B = nn.Linear(r, d_out, bias=False)
    with torch.no_grad():
        lora_A.weight.normal_(0, 1 / d_in**0.5)
        lora_B.weight.normal_(0, b_scale / max(r, 1) ** 0.5)
    x = torch.randn(T, d_in)
    return dict(base=base, lora_A=lora_A, lora_B=lora_B, x=x, scaling=scaling, fifo=fifo)


def run_linear(layer_cls, case, dtype, *, dropout_path=False, magnitude=None, dy=None):
    """Build one DoRA layer of ``layer_cls`` on a dtype copy of ``case``; return output and grads."""
    base = copy.deepcopy(case["base"]).to(dtype).requires_grad_(False)
    lora_A = copy.deepcopy(case["lora_A"]).to(dtype)
    lora_B = copy.deepcopy(case["lora_B"]).to(dtype)
    layer = layer_cls(fan_in_fan_out=case["fifo"])
    layer.update_layer(base_layer=base, lora_A=lora_A.weight, lora_B=lora_B.weight, scaling=case["scaling"])
    if magnitude is not None:
        with torch.no_grad():
            layer.weight.copy_(magnitude.to(layer.weight.dtype))
    x = case["x"].to(dtype).requires_grad_(True)
    base_result = None if dropout_path else base(x)
    delta = layer(
        x, lora_A=lora_A, lora_B=lora_B, scaling=case["scaling"], base_layer=base, base_result=base_result
    )
    out = (base(x) if dropout_path else base_result) + delta
    if dy is None:
        dy = torch.randn_like(out, dtype=torch.float64)
    out.backward(dy.to(out.dtype))
    grads = dict(x=x.grad, A=lora_A.weight.grad, B=lora_B.weight.grad, m=layer.weight.grad)
    return out.detach(), grads, layer.weight.detach().clone(), dy


def perturbed_magnitude(case, reference):
    """A magnitude away from the init value (so g != 1), from the fp64 reference init."""
    _, _, m0, _ = run_linear(reference.DoraLinearLayer, case, torch.float64)
    return m0 * (1 + 0.05 * torch.randn_like(m0))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("bias,fifo,dropout_path", [(True, False, False), (False, True, False), (True, False, True)],
                         ids=["bias", "fifo-nobias", "dropout-path"])
def test_linear_matches_reference(reference, shape, dtype, bias, fifo, dropout_path):
    case = make_linear_case(shape, bias=bias, fifo=fifo)
    m = perturbed_magnitude(case, reference)
    truth, truth_grads, m_init64, dy = run_linear(reference.DoraLinearLayer, case, torch.float64, magnitude=m,
                                                  dropout_path=dropout_path)
    out, grads, m_init, _ = run_linear(ours().DoraLinearLayer, case, dtype, magnitude=m, dy=dy,
                                       dropout_path=dropout_path)
    assert out.dtype == dtype
    if dtype in (torch.float64, torch.float32):
        tol = TOLS[dtype]
        assert_close(out, truth, atol=tol.atol, rtol=tol.rtol, name="output")
        for key in truth_grads:
            assert_close(grads[key], truth_grads[key], atol=tol.atol, rtol=tol.rtol, name=f"grad {key}")
        return
    ref_out, ref_grads, _, _ = run_linear(reference.DoraLinearLayer, case, dtype, magnitude=m, dy=dy,
                                          dropout_path=dropout_path)
    # tiny tensors make a per-case "ours <= reference" a coin flip: here each error is bounded by the
    # larger of the reference's own and two units of the dtype's rounding; the aggregate comparison is
    # test_half_precision_error_no_larger_than_reference
    bound = 2 * torch.finfo(dtype).eps
    for key, ours_t, ref_t, truth_t in [("output", out, ref_out, truth)] + [
        (f"grad {k}", grads[k], ref_grads[k], truth_grads[k]) for k in truth_grads
    ]:
        ours_err, ref_err = rel_rms(ours_t, truth_t), rel_rms(ref_t, truth_t)
        assert ours_err <= max(1.1 * ref_err, bound), f"{key}: ours {ours_err:.3e} vs reference {ref_err:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: DTYPE_IDS[d])
def test_half_precision_error_no_larger_than_reference(reference, dtype):
    """Summed over seeds at a medium ragged shape, our error vs fp64 is no larger than the reference's."""
    totals = {"ours": 0.0, "ref": 0.0}
    for seed in range(4):
        torch.manual_seed(100 + seed)
        case = make_linear_case((64, 96, 80, 16), b_scale=1.0)
        m = perturbed_magnitude(case, reference)
        truth, tg, _, dy = run_linear(reference.DoraLinearLayer, case, torch.float64, magnitude=m)
        for name, cls in (("ours", ours().DoraLinearLayer), ("ref", reference.DoraLinearLayer)):
            out, grads, _, _ = run_linear(cls, case, dtype, magnitude=m, dy=dy)
            totals[name] += rel_rms(out, truth) + sum(rel_rms(grads[k], tg[k]) for k in tg)
    assert totals["ours"] <= 1.02 * totals["ref"], totals


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=_shape_id)
def test_magnitude_init_equals_row_norm(reference, shape):
    case = make_linear_case(shape)
    _, _, m_ours, _ = run_linear(ours().DoraLinearLayer, case, torch.float64)
    _, _, m_ref, _ = run_linear(reference.DoraLinearLayer, case, torch.float64)
    W = case["base"].weight.double()
    dense = torch.linalg.norm(W + case["scaling"] * case["lora_B"].weight.double() @ case["lora_A"].weight.double(), dim=1)
    assert_close(m_ours, dense, atol=1e-12, rtol=1e-10, name="m vs dense norm")
    assert_close(m_ours, m_ref, atol=1e-12, rtol=1e-10, name="m vs reference")


def test_dora_equals_base_when_B_is_zero():
    """Invariant: with B = 0 and m at its init, DoRA adds nothing: the output is the base output."""
    case = make_linear_case((9, 20, 13, 4))
    with torch.no_grad():
        case["lora_B"].weight.zero_()
    out, _, _, _ = run_linear(ours().DoraLinearLayer, case, torch.float64)
    base = case["base"].double()
    assert_close(out, base(case["x"].double()), atol=1e-13, rtol=1e-12, name="B=0")


def test_gradcheck_linear_fp64():
    case = make_linear_case((3, 6, 5, 2))
    base = case["base"].double().requires_grad_(False)
    lora_A, lora_B = case["lora_A"].double(), case["lora_B"].double()
    layer = ours().DoraLinearLayer(fan_in_fan_out=False)
    layer.update_layer(base_layer=base, lora_A=lora_A.weight, lora_B=lora_B.weight, scaling=0.5)

    def fn(x, a, b, m):
        # plain tensors (not new Parameters) so gradients flow back to gradcheck's inputs
        for mod, t in ((lora_A, a), (lora_B, b), (layer, m)):
            del mod.weight
            mod.weight = t
        # gradcheck perturbs A and B in place; the norm is a constant in backward, so hold it fixed
        with ours_config(norm_cache=False):
            return base(x) + layer(x, lora_A=lora_A, lora_B=lora_B, scaling=0.5, base_layer=base, base_result=base(x))

    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    m = layer.weight.detach().clone().requires_grad_(True)
    a = lora_A.weight.detach().clone().requires_grad_(True)
    b = lora_B.weight.detach().clone().requires_grad_(True)
    # n is detached: check x and m exactly (A, B enter n, whose gradient DoRA drops on purpose)
    assert torch.autograd.gradcheck(lambda x_, m_: fn(x_, a.detach(), b.detach(), m_), (x, m))
    # A and B: gradcheck against a function whose norm is frozen at the current A, B
    n = ours().factored_row_norm(base.weight, a.detach(), b.detach(), 0.5)

    def frozen_norm(x_, a_, b_, m_):
        lora = (x_ @ a_.T) @ b_.T
        base_out = x_ @ base.weight.T
        g = (m_ / n).view(1, -1)
        return base(x_) + (g - 1) * base_out + g * 0.5 * lora

    assert torch.autograd.gradcheck(frozen_norm, (x, a, b, m))
    out = fn(x, a.detach(), b.detach(), m.detach())
    assert_close(out, frozen_norm(x, a, b, m), atol=1e-12, rtol=1e-10, name="layer vs frozen-norm formula")


def ours_config(**kw):
    import importlib

    env = ours().__name__.rsplit(".", 1)[0] + ".dora_env"
    return importlib.import_module(env).config_override(**kw)


# ---------------------------------------------------------------------------------------------
# Embedding and Conv
# ---------------------------------------------------------------------------------------------


def run_embedding(layer_cls, num_emb, emb_dim, r, dtype, idx, m=None, dy=None):
    torch.manual_seed(1)
    base = nn.Embedding(num_emb, emb_dim).to(dtype).requires_grad_(False)
    emb_A = nn.Parameter(torch.randn(r, num_emb).to(dtype))
    emb_B = nn.Parameter((0.3 * torch.randn(emb_dim, r)).to(dtype))
    layer = layer_cls(fan_in_fan_out=True)
    layer.update_layer(base_layer=base, lora_A=emb_A, lora_B=emb_B, scaling=0.5)
    if m is not None:
        with torch.no_grad():
            layer.weight.copy_(m)
    g, res = layer(idx, lora_A=emb_A.T, lora_B=emb_B.T, scaling=0.5, base_layer=base,
                   embed_fn=lambda x, w: F.embedding(x, w))
    out = g * base(idx) + res
    dy = torch.randn(out.shape, dtype=torch.float64) if dy is None else dy
    out.backward(dy.to(out.dtype))
    return out.detach(), dict(A=emb_A.grad, B=emb_B.grad, m=layer.weight.grad), layer.weight.detach(), dy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: DTYPE_IDS[d])
def test_embedding_matches_reference(reference, dtype):
    idx = torch.randint(0, 11, (3, 5))
    truth, tg, m0, dy = run_embedding(reference.DoraEmbeddingLayer, 11, 7, 3, torch.float64, idx)
    m = m0 * 1.1
    truth, tg, _, dy = run_embedding(reference.DoraEmbeddingLayer, 11, 7, 3, torch.float64, idx, m=m, dy=dy)
    out, grads, m_ours, _ = run_embedding(ours().DoraEmbeddingLayer, 11, 7, 3, dtype, idx, m=m.to(dtype), dy=dy)
    tol = TOLS[dtype]
    assert_close(out, truth, atol=tol.atol, rtol=tol.rtol, name="embedding output")
    for key in tg:
        assert_close(grads[key], tg[key], atol=tol.atol, rtol=tol.rtol, name=f"embedding grad {key}")


CONV_CASES = [
    ("Conv1dLayer", nn.Conv1d, (2, 3, 11), 3),
    ("Conv2dLayer", nn.Conv2d, (2, 3, 7, 6), 3),
    ("Conv3dLayer", nn.Conv3d, (1, 2, 5, 4, 5), 2),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("name,conv,xshape,k", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("dropout_path", [False, True], ids=["base-result", "dropout-path"])
def test_conv_matches_reference(reference, dtype, name, conv, xshape, k, dropout_path):
    c_in, c_out, r = xshape[1], 5, 3
    torch.manual_seed(2)
    base0 = conv(c_in, c_out, k, bias=True)
    A0, B0 = conv(c_in, r, k, bias=False), conv(r, c_out, 1, bias=False)
    x0 = torch.randn(xshape)
    results = {}
    for impl, dt in (("ref", torch.float64), ("ours", dtype)):
        mod = reference if impl == "ref" else ours()
        base = copy.deepcopy(base0).to(dt).requires_grad_(False)
        A, B = copy.deepcopy(A0).to(dt), copy.deepcopy(B0).to(dt)
        layer = getattr(mod, "Dora" + name)(fan_in_fan_out=False)
        layer.update_layer(base_layer=base, lora_A=A.weight, lora_B=B.weight, scaling=0.8)
        with torch.no_grad():
            layer.weight.mul_(1.07)
        x = x0.to(dt).requires_grad_(True)
        br = None if dropout_path else base(x)
        out = base(x) + layer(x, lora_A=A, lora_B=B, scaling=0.8, base_layer=base, base_result=br)
        torch.manual_seed(3)
        out.backward(torch.randn(out.shape, dtype=torch.float64).to(dt))
        results[impl] = (out.detach(), dict(x=x.grad, A=A.weight.grad, B=B.weight.grad, m=layer.weight.grad),
                         layer.weight.shape)
    tol = TOLS[dtype]
    assert results["ours"][2] == results["ref"][2], "magnitude shape must match upstream's [1, out, 1, ...]"
    assert_close(results["ours"][0], results["ref"][0], atol=tol.atol, rtol=tol.rtol, name="conv output")
    for key in results["ref"][1]:
        assert_close(results["ours"][1][key], results["ref"][1][key], atol=tol.atol, rtol=tol.rtol, name=f"conv grad {key}")
