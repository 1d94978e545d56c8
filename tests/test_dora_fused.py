"""CPU tests of the fused DoRA kernels, run through Triton's interpreter.

Every kernel is checked against its pure-PyTorch twin (``dora_fused_naive``)
and against an fp64 computation written out here, with poisoned (NaN)
outputs so an unwritten element cannot pass. Shapes stay tiny: the
interpreter runs each program in numpy.

Triton's interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to
nearest even), so bf16 comparisons allow one bf16 ulp (rtol 2**-7).
"""

import os

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib.util  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

try:
    pytest.importorskip("triton")
finally:
    # Leave the session as found (GPU tests collected later must compile, not interpret);
    # the fixture below sets the interpreter again while this module's tests run.
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

import torch  # noqa: E402

from dorafactors import dora_fused as F  # noqa: E402
from dorafactors import dora_fused_launch as L  # noqa: E402
from dorafactors.dora_fused_naive import (  # noqa: E402
    dora_compose_backward_reference,
    dora_compose_reference,
    dora_norm_assembly_reference,
)


@pytest.fixture(autouse=True, scope="module")
def _triton_interpreter():
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    yield
    mp.undo()


S = 0.5  # exactly representable: the kernels take s as an fp32 scalar

# (dtype, atol, rtol) for outputs rounded once to dtype, against fp64.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-2, 2**-7, id="bf16"),
    pytest.param(torch.float16, 1e-3, 2**-10, id="fp16"),
]
# base shape [..., d_out]; each list has a ragged row.
COMPOSE_SHAPES = [(1, 1), (1, 64), (63, 341), (2, 5, 17)]
NORM_SHAPES = [(1, 1), (64, 16), (341, 17), (40, 33)]  # (d_out, r)


def _sid(shape):
    return "T" + "x".join(map(str, shape[:-1])) + f"-dout{shape[-1]}"


def _nid(shape):
    return f"dout{shape[0]}-r{shape[1]}"


def assert_close(actual, expected, atol, rtol, what, scale=None):
    """NaN check first, then |a - e| <= atol + rtol * scale (scale defaults to |e|).

    On failure reports max-abs and relative-RMS error and the first mismatching indices.
    """
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    bad_nan = torch.isnan(a) & ~torch.isnan(e)
    assert not bad_nan.any(), f"{what}: NaN at {bad_nan.nonzero()[:5].tolist()} (unwritten or invalid)"
    err = (a - e).abs()
    scale = e.abs() if scale is None else scale.detach().double().cpu()
    bad = err > atol + rtol * scale
    if bad.any():
        rel_rms = (err.pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-30)).item()
        idx = bad.nonzero()[:5].tolist()
        vals = [(tuple(i), a[tuple(i)].item(), e[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{what}: {int(bad.sum())} mismatches, max-abs {err.max().item():.3e}, "
            f"rel-RMS {rel_rms:.3e}; first (index, actual, expected): {vals}"
        )


def _inputs(shape, dtype, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    d_out = shape[-1]
    base = torch.randn(shape, generator=gen).to(dtype)
    lora = torch.randn(shape, generator=gen).to(dtype)
    m = torch.rand(d_out, generator=gen) + 0.5
    n = torch.rand(d_out, generator=gen) + 0.5
    b = torch.randn(d_out, generator=gen).to(dtype) if bias else None
    return base, lora, m, n, b


def _fp64_compose(base, lora, m, n, s, bias=None):
    out = (m.double() / n.double()) * (base.double() + s * lora.double())
    return out + bias.double() if bias is not None else out


# ---------------------------------------------------------------------------
# Compose forward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", COMPOSE_SHAPES, ids=_sid)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_compose_fwd_kernel(shape, dtype, atol, rtol, bias):
    base, lora, m, n, b = _inputs(shape, dtype, bias=bias)
    d_out = shape[-1]
    b2, l2 = base.reshape(-1, d_out), lora.reshape(-1, d_out)
    out = torch.full(b2.shape, float("nan"), dtype=dtype)
    v = torch.full(b2.shape, float("nan"), dtype=dtype)
    # Small explicit tiles: several programs along both T and d_out, ragged edges masked.
    F._launch_compose_fwd(b2, l2, m, n, S, b, True, out=out, v=v, block_t=16, block_d=32)
    twin = dora_compose_reference(base, lora, m, n, S, b).reshape(-1, d_out)
    exact = _fp64_compose(base, lora, m, n, S, b).reshape(-1, d_out)
    assert_close(out, twin, atol, rtol, "out vs twin")
    assert_close(out, exact, atol, rtol, "out vs fp64")
    assert_close(twin, exact, atol, rtol, "twin vs fp64")
    assert_close(v, (base.double() + S * lora.double()).reshape(-1, d_out), atol, rtol, "v vs fp64")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_compose_fwd_tuned_path(dtype, atol, rtol):
    base, lora, m, n, b = _inputs((63, 341), dtype, bias=True)
    out, v = F._launch_compose_fwd(base, lora, m, n, S, b, False)
    assert v is None
    assert out.dtype == dtype
    assert_close(out, _fp64_compose(base, lora, m, n, S, b), atol, rtol, "out vs fp64")


def test_compose_equals_lora_when_magnitude_is_norm():
    # m = n  =>  g = 1 exactly, and DoRA reduces to LoRA: out = base + s·lora.
    base, lora, _, n, _ = _inputs((33, 70), torch.float32)
    out = F.dora_compose(base, lora, n.clone(), n, S)
    torch.testing.assert_close(out, base + S * lora, rtol=0, atol=0)


def test_compose_mixed_dtypes_fp32_lora_bf16_base():
    # PEFT's fp32 adapters without autocast: lora fp32, base bf16; out and d_base bf16, d_lora fp32.
    base, _, m, n, _ = _inputs((9, 40), torch.bfloat16)
    lora = torch.randn(9, 40)
    base.requires_grad_()
    lora.requires_grad_()
    out = F.dora_compose(base, lora, m, n, S)
    assert out.dtype == torch.bfloat16
    assert_close(out, _fp64_compose(base, lora, m, n, S), 1e-2, 2**-7, "out vs fp64")
    out.backward(torch.ones_like(out))
    assert base.grad.dtype == torch.bfloat16 and lora.grad.dtype == torch.float32
    assert_close(lora.grad, (S * m / n).expand(9, 40), 1e-6, 1e-6, "d_lora")


def test_compose_empty_tokens():
    base = torch.zeros(0, 8, requires_grad=True)
    lora = torch.zeros(0, 8, requires_grad=True)
    m = torch.ones(8, requires_grad=True)
    out = F.dora_compose(base, lora, m, torch.ones(8), S)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(m.grad, torch.zeros(8))


# ---------------------------------------------------------------------------
# Compose backward (launcher level, poisoned outputs)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", COMPOSE_SHAPES, ids=_sid)
@pytest.mark.parametrize("saved_is_out", [False, True], ids=["save-v", "save-out"])
def test_compose_bwd_kernel(shape, dtype, atol, rtol, saved_is_out):
    base, lora, m, n, _ = _inputs(shape, dtype)
    d_out = shape[-1]
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    out, v = F._launch_compose_fwd(base.reshape(-1, d_out), lora.reshape(-1, d_out), m, n, S, None, True)
    saved = out if saved_is_out else v
    dy2 = dy.reshape(-1, d_out)
    d_base = torch.full(dy2.shape, float("nan"), dtype=dtype)
    d_lora = torch.full(dy2.shape, float("nan"), dtype=dtype)
    # t_chunk 24 with block_t 8: several T chunks, each looping over ragged blocks.
    got = F._launch_compose_bwd(
        dy2, saved, m, n, S, saved_is_out=saved_is_out, need_dbase=True, need_dlora=True, need_dm=True,
        need_dbias=True, lora_dtype=dtype, acc_dtype=torch.float32, d_base=d_base, d_lora=d_lora,
        block_t=8, block_d=64, t_chunk=24)
    twin = dora_compose_backward_reference(dy, base, lora, m, n, S)
    g64 = m.double() / n.double()
    dy64, v64 = dy2.double(), (base.double() + S * lora.double()).reshape(-1, d_out)
    exact = (g64 * dy64, S * g64 * dy64, (dy64 * v64).sum(0) / n.double())
    dm_scale = (dy64 * v64).abs().sum(0) / n.double()
    for name, k, tw, ex in zip(("d_base", "d_lora"), got[:2], twin[:2], exact[:2]):
        assert_close(k, tw.reshape(-1, d_out), atol, rtol, f"{name} vs twin")
        assert_close(k, ex, atol, rtol, f"{name} vs fp64")
    # d_m reads v (or out) rounded to dtype: error is relative to Σ|dy·v|/n.
    assert_close(got[2], twin[2], 1e-5, 2 * rtol, "d_m vs twin", scale=dm_scale)
    assert_close(got[2], exact[2], 1e-5, 2 * rtol, "d_m vs fp64", scale=dm_scale)
    assert_close(got[3], dy64.sum(0), 1e-5, 1e-5, "d_bias vs fp64", scale=dy64.abs().sum(0))


def test_compose_bwd_only_what_is_asked():
    base, lora, m, n, _ = _inputs((20, 48), torch.float32)
    dy = torch.randn(20, 48)
    d_base, d_lora, d_m, d_bias = F._launch_compose_bwd(
        dy, None, m, n, S, saved_is_out=False, need_dbase=True, need_dlora=False, need_dm=False,
        need_dbias=False, lora_dtype=torch.float32, acc_dtype=torch.float32)
    assert d_lora is None and d_m is None and d_bias is None
    torch.testing.assert_close(d_base, (m / n) * dy)


# ---------------------------------------------------------------------------
# Autograd through the public entry and the Function
# ---------------------------------------------------------------------------


def _grads(fn, base, lora, m, bias, dy):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in (base, lora, m)]
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out = fn(*leaves, b)
    wrt = [t for t in leaves + [b] if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, dy)
    return out, grads


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "bias, save_out, m_grad",
    [(False, False, True), (False, True, True), (True, False, True), (True, False, False), (False, True, False)],
    ids=["save-v", "save-out", "bias-save-v", "bias-m-frozen", "m-frozen"],
)
def test_autograd_matches_twin_and_fp64(dtype, atol, rtol, bias, save_out, m_grad):
    shape = (3, 11, 37)
    base, lora, m, n, b = _inputs(shape, dtype, seed=3, bias=bias)
    base.requires_grad_()
    lora.requires_grad_()
    m.requires_grad_(m_grad)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(11)).to(dtype)  # one upstream gradient

    def fused(b_, l_, m_, bias_):
        return F.dora_compose(b_, l_, m_, n, S, bias_, save_out_for_mag_grad=save_out)

    def twin(b_, l_, m_, bias_):
        return dora_compose_reference(b_, l_, m_, n, S, bias_)

    def fp64(b_, l_, m_, bias_):
        return _fp64_compose(b_, l_, m_, n, S, bias_)

    out_k, g_k = _grads(fused, base, lora, m, b, dy)
    out_t, g_t = _grads(twin, base, lora, m, b, dy)
    _, g_e = _grads(fp64, base.double(), lora.double(), m.double(), b.double() if bias else None, dy.double())
    assert len(g_k) == len(g_t) == 2 + int(m_grad) + int(bias)
    assert_close(out_k, out_t, atol, rtol, "out vs twin")
    names = ["d_base", "d_lora"] + (["d_m"] if m_grad else []) + (["d_bias"] if bias else [])
    v_abs = (base.double() + S * lora.double()).abs()
    for name, k, t, e in zip(names, g_k, g_t, g_e):
        assert k.dtype == t.dtype, f"{name}: dtype {k.dtype} != twin's {t.dtype}"
        if name == "d_m":
            scale = (dy.double().abs() * v_abs).reshape(-1, shape[-1]).sum(0) / n.double()
            assert_close(k, t, 1e-5, 2 * rtol, "d_m vs twin", scale=scale)
            assert_close(k, e, 1e-5, 2 * rtol, "d_m vs fp64", scale=scale)
        elif name == "d_bias":
            scale = dy.double().abs().reshape(-1, shape[-1]).sum(0)
            assert_close(k, e, 1e-5, 2 * rtol, "d_bias vs fp64", scale=scale)
        else:
            assert_close(k, t, atol, rtol, f"{name} vs twin")
            assert_close(k, e, atol, rtol, f"{name} vs fp64")


@pytest.mark.parametrize(
    "m_grad, save_out, expect",
    [(False, False, "none"), (True, False, "v"), (True, True, "out")],
    ids=["m-frozen", "save-v", "save-out"],
)
def test_saved_tensors_for_backward(m_grad, save_out, expect):
    """Memory: no [T, d_out] tensor is saved unless m needs a gradient; save-out keeps only `out`."""
    base, lora, m, n, _ = _inputs((16, 24), torch.bfloat16)
    base.requires_grad_()
    m.requires_grad_(m_grad)
    big = []

    def pack(t):
        if t.numel() == 16 * 24:
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = F.dora_compose(base, lora, m, n, S, save_out_for_mag_grad=save_out)
    if expect == "none":
        assert big == []
    else:
        assert len(big) == 1
        assert (big[0].data_ptr() == out.data_ptr()) == (expect == "out")
    out.sum().backward()


def test_gradcheck_fp64_function_and_entry():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    lora = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    m = (torch.rand(5, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    n = torch.rand(5, dtype=torch.float64, generator=gen) + 0.5
    bias = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda b, l, m_, bi: F.FusedDoraCompose.apply(b, l, m_, n, S, bi, False), (base, lora, m, bias))
    assert torch.autograd.gradcheck(
        lambda b, l, m_: F.dora_compose(b, l, m_, n, S, save_out_for_mag_grad=True), (base, lora, m))
    # The custom op's registered autograd (what torch.compile uses), called eagerly.
    assert torch.autograd.gradcheck(
        lambda b, l, m_, bi: torch.ops.dorafactors.dora_compose_fwd(b, l, m_, n, S, bi, F.SAVE_V)[0],
        (base, lora, m, bias))


def test_function_matches_entry():
    base, lora, m, n, b = _inputs((7, 19), torch.float32, bias=True)
    m.requires_grad_()
    dy = torch.randn(7, 19)
    o1, g1 = _grads(lambda x, y, z, w: F.FusedDoraCompose.apply(x, y, z, n, S, w, False), base, lora, m, b, dy)
    o2, g2 = _grads(lambda x, y, z, w: F.dora_compose(x, y, z, n, S, w), base, lora, m, b, dy)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(9)
    T, d = 13, 21
    base = torch.randn(d, T, generator=gen).t()  # transposed view: column stride != 1
    lora = torch.randn(T, 2 * d, generator=gen)[:, :d]  # row stride 2d, no copy needed
    m = (torch.rand(2 * d, generator=gen) + 0.5)[::2].requires_grad_()  # strided vector
    n = torch.rand(d, generator=gen) + 0.5
    base.requires_grad_()
    dy = torch.randn(d, T, generator=gen).t()  # non-contiguous upstream gradient
    out = F.dora_compose(base, lora, m, n, S)
    out.backward(dy)
    exact = _fp64_compose(base, lora, m.detach(), n, S)
    assert_close(out, exact, 1e-5, 1e-5, "out")
    g = m.detach().double() / n.double()
    assert_close(base.grad, g * dy.double(), 1e-5, 1e-5, "d_base")
    assert_close(m.grad, (dy.double() * (base.double() + S * lora.double())).sum(0) / n.double(), 1e-5, 1e-5, "d_m")


def test_torch_compile_aot_eager_fullgraph():
    base, lora, m, n, b = _inputs((6, 24), torch.float32, bias=True)
    base.requires_grad_()
    m.requires_grad_()

    def fn(x, y, mag, bias):
        return F.dora_compose(x, y, mag, n, S, bias).sin().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y_c = compiled(base, lora, m, b)
    g_c = torch.autograd.grad(y_c, (base, m))
    y_e = fn(base, lora, m, b)
    g_e = torch.autograd.grad(y_e, (base, m))
    torch.testing.assert_close(y_c, y_e)
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e)

    def norm_fn(base_sq, U, B, G, mag):
        return F.dora_norm_assembly(base_sq, U, B, G, S, mag, 1e-6)[0] * 2

    args = _norm_inputs((24, 4), torch.float32)
    torch.testing.assert_close(torch.compile(norm_fn, backend="aot_eager", fullgraph=True)(*args), norm_fn(*args))


def test_opcheck_custom_ops():
    base, lora, m, n, b = _inputs((4, 16), torch.float32, bias=True)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.dorafactors.dora_compose_fwd.default,
                          (base, lora, m.requires_grad_(), n, S, b, F.SAVE_V), test_utils=tests)
    dy = torch.randn(4, 16)
    torch.library.opcheck(torch.ops.dorafactors.dora_compose_bwd.default,
                          (dy, dy, m.detach(), n, S, F.SAVE_V, True, True, True, True, torch.float32, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.dorafactors.dora_norm_assembly.default,
                          (*_norm_inputs((16, 3), torch.float32)[:4], S, m.detach(), 1e-6),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------
# Norm assembly
# ---------------------------------------------------------------------------


def _norm_inputs(shape, dtype, seed=0):
    d_out, r = shape
    d_in = 24
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    A = torch.randn(r, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
    B = torch.randn(d_out, r, generator=gen, dtype=torch.float64) * 0.5
    base_sq = (W * W).sum(1).float()
    m = torch.rand(d_out, generator=gen) + 0.5
    return base_sq, (W @ A.T).to(dtype), B.to(dtype), (A @ A.T).to(dtype), m


def _fp64_norm(base_sq, U, B, G, s, m, eps):
    Bd = B.double()
    nsq = base_sq.double() + 2 * s * (Bd * U.double()).sum(1) + s * s * ((Bd @ G.double()) * Bd).sum(1)
    n = nsq.clamp_min(0).sqrt().clamp_min(eps)
    return n, m.double() / n


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=_nid)
def test_norm_assembly_kernel(shape, dtype, atol, rtol):
    # Inputs are the same rounded values for all three: only fp32 accumulation differs.
    base_sq, U, B, G, m = _norm_inputs(shape, dtype)
    n_out = torch.full((shape[0],), float("nan"))
    g_out = torch.full((shape[0],), float("nan"))
    n, g = F._launch_norm_assembly(base_sq, U, B, G, S, m, 1e-6, n_out=n_out, g_out=g_out, block_d=16, block_r=16)
    n_t, g_t = dora_norm_assembly_reference(base_sq, U, B, G, S, m, 1e-6)
    n_e, g_e = _fp64_norm(base_sq, U, B, G, S, m, 1e-6)
    assert n.dtype == g.dtype == torch.float32
    for name, k, t, e in (("n", n, n_t, n_e), ("g", g, g_t, g_e)):
        assert_close(k, t, 1e-6, 1e-5, f"{name} vs twin")
        assert_close(k, e, 1e-6, 1e-5, f"{name} vs fp64")
        assert_close(t, e, 1e-6, 1e-5, f"twin {name} vs fp64")


@pytest.mark.parametrize("shape", [(341, 17), (20, 0)], ids=_nid)
def test_norm_assembly_entry_tuned_path(shape):
    base_sq, U, B, G, m = _norm_inputs(shape, torch.bfloat16)
    n, g = F.dora_norm_assembly(base_sq, U, B, G, S, m, 1e-6)
    n_e, g_e = _fp64_norm(base_sq, U, B, G, S, m, 1e-6)
    assert_close(n, n_e, 1e-6, 1e-5, "n vs fp64")
    assert_close(g, g_e, 1e-6, 1e-5, "g vs fp64")


def test_norm_assembly_fp64():
    base_sq, U, B, G, m = _norm_inputs((40, 33), torch.float64)
    n, g = F.dora_norm_assembly(base_sq.double(), U, B, G, S, m.double(), 1e-6)
    n_e, g_e = _fp64_norm(base_sq, U, B, G, S, m, 1e-6)
    assert n.dtype == torch.float64
    assert_close(n, n_e, 1e-12, 1e-12, "n vs fp64")


def test_norm_invariants():
    base_sq, U, B, G, m = _norm_inputs((50, 20), torch.float32)
    # B = 0: the norm is the base row norm.
    n0, _ = F.dora_norm_assembly(base_sq, U, torch.zeros_like(B), G, S, m, 1e-6)
    torch.testing.assert_close(n0, base_sq.sqrt(), rtol=1e-6, atol=0)
    # m initialised to the row norm: g = 1 exactly.
    n, _ = F.dora_norm_assembly(base_sq, U, B, G, S, m, 1e-6)
    _, g = F.dora_norm_assembly(base_sq, U, B, G, S, n.clone(), 1e-6)
    assert torch.equal(g, torch.ones_like(g))


def test_norm_zero_and_negative_rows_clamp_to_eps():
    # Row 0: all zero (peft issue 2049 gave inf/NaN). Row 1: rounding makes ‖·‖² slightly negative.
    base_sq = torch.tensor([0.0, 1.0])
    B = torch.tensor([[0.0], [1.0]])
    U = torch.tensor([[0.0], [-1.0]])
    G = torch.zeros(1, 1)
    m = torch.ones(2)
    n, g = F.dora_norm_assembly(base_sq, U, B, G, 0.5000001, m, 1e-6)
    torch.testing.assert_close(n, torch.full((2,), 1e-6), rtol=1e-6, atol=0)
    assert torch.isfinite(g).all()


# ---------------------------------------------------------------------------
# Validation at the public entries
# ---------------------------------------------------------------------------


def _ok():
    base, lora, m, n, b = _inputs((4, 8), torch.float32, bias=True)
    return dict(base=base, lora=lora, m=m, n=n, s=S, bias=b)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        ({"lora": torch.zeros(4, 9)}, ValueError, r"`lora` has shape \(4, 9\).*must match"),
        ({"m": torch.ones(7)}, ValueError, r"`m` has shape \(7,\).*d_out=8"),
        ({"n": torch.ones(9)}, ValueError, r"`n` has shape"),
        ({"bias": torch.ones(3)}, ValueError, r"`bias` has shape"),
        ({"base": torch.zeros(4, 8, dtype=torch.int64)}, TypeError, r"`base` has dtype torch.int64; accepted"),
        ({"m": torch.ones(8, dtype=torch.int32)}, TypeError, r"`m` has dtype torch.int32"),
        ({"lora": [[0.0] * 8] * 4}, TypeError, r"`lora` must be a torch.Tensor, got list"),
        ({"s": torch.tensor(0.5)}, TypeError, r"`s` must be a Python float"),
        ({"n": torch.ones(8, device="meta")}, ValueError, r"`n` is on meta but `base` is on cpu"),
        ({"base": torch.tensor(1.0), "lora": torch.tensor(1.0)}, ValueError, r"at least one dimension"),
    ],
    ids=["lora-shape", "m-numel", "n-numel", "bias-numel", "base-int", "m-int", "lora-list", "s-tensor",
         "device-mismatch", "scalar"],
)
def test_compose_validation(change, exc, match):
    kw = {**_ok(), **change}
    with pytest.raises(exc, match=match):
        F.dora_compose(kw["base"], kw["lora"], kw["m"], kw["n"], kw["s"], kw["bias"])


def test_compose_save_out_needs_no_bias():
    kw = _ok()
    with pytest.raises(ValueError, match="save_out_for_mag_grad=True needs bias=None"):
        F.dora_compose(**kw, save_out_for_mag_grad=True)


def test_kernels_need_cuda_without_interpreter(monkeypatch):
    kw = _ok()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert F.is_available() == torch.cuda.is_available()
    with pytest.raises(ValueError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        F.dora_compose(**kw)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        ({"G": torch.zeros(3, 4)}, ValueError, r"`G` has shape \(3, 4\); expected \[r, r\] = \(4, 4\)"),
        ({"U": torch.zeros(8, 3)}, ValueError, r"`U` has shape \(8, 3\)"),
        ({"B": torch.zeros(8)}, ValueError, r"`B` must be \[d_out, r\]"),
        ({"base_sq": torch.zeros(5)}, ValueError, r"`base_sq` has shape"),
        ({"m": torch.zeros(8, dtype=torch.int64)}, TypeError, r"`m` has dtype torch.int64"),
        ({"eps": 0.0}, ValueError, r"`eps` must be a finite number > 0"),
        ({"s": "0.5"}, TypeError, r"`s` must be a Python float"),
        ({"U": torch.zeros(8, 4, device="meta")}, ValueError, r"`U` is on meta"),
    ],
    ids=["G-shape", "U-shape", "B-1d", "base_sq-numel", "m-int", "eps-zero", "s-str", "device-mismatch"],
)
def test_norm_validation(change, exc, match):
    kw = dict(base_sq=torch.ones(8), U=torch.zeros(8, 4), B=torch.zeros(8, 4), G=torch.zeros(4, 4), s=S,
              m=torch.ones(8), eps=1e-6)
    kw.update(change)
    with pytest.raises(exc, match=match):
        F.dora_norm_assembly(**kw)


# ---------------------------------------------------------------------------
# Autotune configuration and import without Triton
# ---------------------------------------------------------------------------


def test_autotune_config_lists():
    small, wide = L.autotune_configs(False), L.autotune_configs(True)
    for name in ("compose_fwd", "compose_bwd", "norm"):
        assert 1 <= len(small[name]) <= 8
        assert len(wide[name]) > 3 * len(small[name])
        for c in small[name] + wide[name]:
            for v in c.kwargs.values():
                assert v & (v - 1) == 0, f"{name}: block size {v} is not a power of two"
        if name == "norm":
            assert all(c.kwargs["BLOCK_R"] >= 16 and c.kwargs["BLOCK_D"] >= 16 for c in wide[name])  # tl.dot
    # Pruning drops tiles far larger than the problem but keeps at least one.
    kept = L.prune_compose(small["compose_fwd"], {"T_BUCKET": 1, "d_out": 1})
    assert kept and all(c.kwargs["BLOCK_T"] <= 8 for c in kept)
    assert L.prune_norm(small["norm"], {"r": 1, "d_out": 1})


@pytest.mark.parametrize("raw, expect", [(None, False), ("0", False), ("1", True), ("yes", ValueError),
                                         ("true", ValueError)])
def test_autotune_comprehensive_env(monkeypatch, raw, expect):
    monkeypatch.setattr(F, "_autotune_override", None)  # no setter call: the validated env config decides
    if raw is None:
        monkeypatch.delenv("DORA_AUTOTUNE_COMPREHENSIVE", raising=False)
    else:
        monkeypatch.setenv("DORA_AUTOTUNE_COMPREHENSIVE", raw)
    if expect is ValueError:
        with pytest.raises(ValueError, match=r"DORA_AUTOTUNE_COMPREHENSIVE=.* is not valid; accepted values"):
            F._autotune_comprehensive()
    else:
        assert F._autotune_comprehensive() is expect


def test_set_autotune_comprehensive(monkeypatch):
    monkeypatch.setattr(F, "_autotune_override", None)
    F.set_autotune_comprehensive(True)
    assert F._autotune_comprehensive() is True
    F.set_autotune_comprehensive(False)
    assert F._autotune_comprehensive() is False
    with pytest.raises(TypeError, match="expects a bool"):
        F.set_autotune_comprehensive(1)


def test_import_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("dorafactors._dora_fused_no_triton", F.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # also re-runs op registration: must not clash
    assert mod.is_available() is False
    with pytest.raises(RuntimeError, match="need Triton"):
        mod._launch_compose_fwd(torch.ones(2, 2), torch.ones(2, 2), torch.ones(2), torch.ones(2), S, None, False)
