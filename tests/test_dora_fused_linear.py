"""The fused linear tail (lora_B's GEMM + compose, ∂m without a saved v) against plain autograd.

Runs the Triton kernels through the interpreter on the CPU (compiled on a GPU machine). The
autograd twin is the DoRA formula written out with differentiable torch ops in fp64.
"""

import re

import pytest

pytest.importorskip("triton")  # conftest.py has set TRITON_INTERPRET=1 where there is no CUDA

import torch  # noqa: E402

from dorafactors import dora_fused_linear as FL  # noqa: E402
from dorafactors.dora_fused_linear import FusedDoraLoraB, compose_lora_b, tail_vectors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _triton_interpreter():
    mp = pytest.MonkeyPatch()
    if DEVICE == "cpu":
        mp.setenv("TRITON_INTERPRET", "1")
    yield
    mp.undo()


def twin(base, ax, B, m, n, s, bias):
    """DoRA's tail with autograd: g ⊙ (base + s·ax·Bᵀ) + bias, n constant."""
    g = m / n.detach()
    out = g * (base + s * (ax @ B.t()))
    return out + bias if bias is not None else out


def _poisoned(real_empty):
    """``torch.empty`` whose floating tensors start as NaN (an unwritten element shows); integer ones, which
    Triton's autotuner allocates on a GPU to flush the cache, are left alone."""
    def empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    return empty


def make(shape_t, d_out, r, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale).to(DEVICE)

    n = rnd(d_out).abs() + 1.0
    return dict(
        base=rnd(*shape_t, d_out).to(dtype),
        ax=rnd(*shape_t, r).to(dtype),
        B=rnd(d_out, r, scale=0.3).to(dtype),
        m=(n * (1 + 0.05 * rnd(d_out))).float(),  # PEFT keeps m in fp32 beside bf16 compute
        n=n.float(),
        bias=rnd(d_out).to(dtype) if bias else None,
    )


def grads_of(fn, inputs, dy, s):
    leaves = {k: (v.detach().clone().requires_grad_(k != "n") if v is not None else None) for k, v in inputs.items()}
    out = fn(leaves["base"], leaves["ax"], leaves["B"], leaves["m"], leaves["n"], s, leaves["bias"])
    out.backward(dy)
    return out.detach(), {k: v.grad for k, v in leaves.items() if v is not None and k != "n"}


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape_t,d_out,r", [((7,), 33, 5), ((2, 3), 64, 16), ((1,), 1, 1)])
@pytest.mark.parametrize("tail_kernel", [False, True], ids=["tail-twin", "tail-kernel"])
def test_matches_fp64_autograd(shape_t, d_out, r, dtype, rtol, bias, tail_kernel, monkeypatch):
    # on a GPU: the [d_out, r] backward through its compiled kernel or its twin (CPU: always interpreted)
    monkeypatch.setattr(FL, "_TAIL_KERNEL_ON_CUDA", tail_kernel)
    inputs = make(shape_t, d_out, r, dtype, bias, seed=d_out + r)
    dy = torch.randn(*shape_t, d_out, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    s = 0.75
    out, grads = grads_of(compose_lora_b, inputs, dy.to(dtype), s)
    wide = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    ref_out, ref_grads = grads_of(twin, wide, dy, s)
    assert out.dtype == dtype and not torch.isnan(out).any()

    def check(a, e, what):
        a, e = a.double(), e.double()
        err = (a - e).abs().max().item()
        scale = e.abs().max().item() + 1e-12
        assert err <= rtol * scale, f"{what}: max err {err:.3g} vs scale {scale:.3g} (rtol {rtol})"

    check(out, ref_out, "out")
    for k, g in ref_grads.items():
        assert grads[k] is not None, f"no gradient for {k}"
        assert grads[k].dtype == inputs[k].dtype, f"{k}: gradient dtype {grads[k].dtype} != {inputs[k].dtype}"
        check(grads[k], g, f"d_{k}")


def test_gradcheck_fp64():
    inputs = make((3,), 9, 4, torch.float64, True, seed=1)
    leaves = [inputs[k].detach().clone().requires_grad_(True) for k in ("base", "ax", "B", "m")]
    n, bias = inputs["n"].double(), inputs["bias"].detach().clone().requires_grad_(True)
    leaves[3] = leaves[3].detach().double().requires_grad_(True)
    def fn(b, a, B, m, bi):
        return FusedDoraLoraB.apply(b, a, B, m, tail_vectors(m, n, 0.5), 0.5, bi)

    assert torch.autograd.gradcheck(fn, (*leaves, bias), eps=1e-6, atol=1e-6)


def test_functorch_transforms_go_through_the_python_wrapper(monkeypatch):
    """The layer calls autograd's C entry directly (less host time) only in plain eager: under a functorch
    transform it must take ``Function.apply``, which routes to functorch (and refuses this Function)."""
    inputs = make((5,), 16, 4, torch.float32, False, seed=3)
    ax = inputs["ax"].clone().requires_grad_(True)
    calls = []
    monkeypatch.setattr(FL, "_apply_c", lambda *a: calls.append("c") or FusedDoraLoraB.apply(*a))
    compose_lora_b(inputs["base"], ax, inputs["B"], inputs["m"], inputs["n"], 0.5).sum().backward()
    assert calls == ["c"]

    def loss(a):
        return compose_lora_b(inputs["base"], a, inputs["B"], inputs["m"], inputs["n"], 0.5).sum()

    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(loss)(inputs["ax"].clone())
    assert calls == ["c"]


def test_frozen_magnitude_saves_no_base_and_gives_no_dm():
    inputs = make((5,), 16, 4, torch.float32, False, seed=3)
    base = inputs["base"].clone().requires_grad_(True)
    ax = inputs["ax"].clone().requires_grad_(True)
    out = compose_lora_b(base, ax, inputs["B"], inputs["m"], inputs["n"], 0.5)
    saved = out.grad_fn.saved_tensors
    assert not any(t is not None and t.shape == base.shape for t in saved), "base kept although m is frozen"
    out.sum().backward()
    assert base.grad is not None and ax.grad is not None


def test_magnitude_gradient_keeps_base_not_v():
    """With m trainable the Function keeps base in its own dtype (bf16), nothing fp32 of [T, d_out]."""
    inputs = make((6,), 16, 4, torch.bfloat16, False, seed=4)
    m = inputs["m"].clone().requires_grad_(True)
    out = compose_lora_b(inputs["base"], inputs["ax"], inputs["B"], m, inputs["n"], 0.5)
    big = [t for t in out.grad_fn.saved_tensors if t is not None and t.shape == inputs["base"].shape]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16


def test_no_grad_forward_matches_twin():
    inputs = make((4,), 12, 3, torch.float32, True, seed=5)
    with torch.no_grad():
        out = compose_lora_b(**{k: v for k, v in inputs.items()}, s=0.25)
        ref = twin(inputs["base"], inputs["ax"], inputs["B"], inputs["m"], inputs["n"], 0.25, inputs["bias"])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fp32_weight_with_bf16_activations_as_under_autocast():
    """PEFT keeps B in fp32 and autocast runs the GEMM in bf16: B's gradient comes back in fp32,
    and the parameter itself is never written by the backward."""
    inputs = make((8,), 24, 6, torch.bfloat16, False, seed=6)
    B32 = inputs["B"].float().clone().requires_grad_(True)
    before = B32.detach().clone()
    m = inputs["m"].clone().requires_grad_(True)
    ax = inputs["ax"].clone().requires_grad_(True)
    out = compose_lora_b(inputs["base"], ax, B32, m, inputs["n"], 0.5)
    assert out.dtype == torch.bfloat16
    dy = torch.randn(8, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out.backward(dy.to(torch.bfloat16))
    assert B32.grad.dtype == torch.float32 and ax.grad.dtype == torch.bfloat16
    assert torch.equal(B32.detach(), before), "backward wrote into the weight"
    _, ref = grads_of(twin, {k: (v.double() if v is not None else None) for k, v in inputs.items()}, dy, 0.5)
    for name, got in (("B", B32.grad), ("m", m.grad), ("ax", ax.grad)):
        err = (got.double() - ref[name]).abs().max().item()
        assert err <= 2e-2 * ref[name].abs().max().item(), f"d_{name}: max err {err:.3g}"


@pytest.mark.parametrize("b_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["B32", "B16b", "B16"])
@pytest.mark.parametrize("d_out,r,chunks", [(37, 5, 3), (64, 80, 1), (1, 1, 2)])
@pytest.mark.parametrize("need", ["all", "no_dm", "only_bs"])
def test_tail_backward_kernel_matches_twin(d_out, r, chunks, b_dtype, need, monkeypatch):
    """The [d_out, r] backward kernel (∂m, ∂B, sg·B) against its PyTorch twin and fp64, outputs poisoned."""
    from dorafactors.dora_fused_naive import lora_b_tail_backward_reference

    gen = torch.Generator().manual_seed(d_out * 7 + r)

    def rnd(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(DEVICE)

    n = rnd(d_out).abs() + 0.5
    tail = tail_vectors((n * (1 + 0.05 * rnd(d_out))).float(), n.float(), 0.75)  # fp32, as the layer keeps it
    P, B = rnd(d_out, r).float(), rnd(d_out, r).to(b_dtype)
    pdm = None if need != "all" else rnd(chunks, d_out).float()
    need_B, need_Bs = need != "only_bs", True
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", _poisoned(real_empty))
    monkeypatch.setattr(FL, "_TAIL_KERNEL_ON_CUDA", True)  # compiled on a GPU, interpreted on the CPU
    d_m, dB, Bs = FL._tail_backward(pdm, P, B, tail, torch.bfloat16, need_B, need_Bs)
    if DEVICE == "cuda":  # again through a direct launch of the kept binary: bit-identical
        from dorafactors import dora_fused_launch

        monkeypatch.setattr(dora_fused_launch, "_DIRECT_LAUNCH", True)
        for _ in range(2):
            again = FL._tail_backward(pdm, P, B, tail, torch.bfloat16, need_B, need_Bs)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(again, (d_m, dB, Bs)))
    monkeypatch.setattr(torch, "empty", real_empty)
    ref = lora_b_tail_backward_reference(pdm, P, B, tail.sg, tail.s_over_n, tail.n, torch.bfloat16)
    wide = lora_b_tail_backward_reference(None if pdm is None else pdm.double(), P.double(), B.double(),
                                          tail.sg.double(), tail.s_over_n.double(), tail.n.double(), torch.float64)
    assert (d_m is None) == (pdm is None) and (dB is None) == (not need_B) and Bs is not None
    for name, got, twin_value, exact in (("d_m", d_m, ref[0], wide[0]), ("dB", dB, ref[1], wide[1]),
                                         ("Bs", Bs, ref[2], wide[2])):
        if got is None:
            continue
        assert not torch.isnan(got).any(), f"{name}: unwritten elements"
        assert got.dtype == twin_value.dtype, f"{name}: dtype {got.dtype} != {twin_value.dtype}"
        tol = 1e-5 if got.dtype == torch.float32 else 1e-2
        scale = exact.abs().max().item() + 1e-12
        assert (got.double() - twin_value.double()).abs().max().item() <= tol * scale, f"{name} vs twin"
        assert (got.double() - exact).abs().max().item() <= tol * scale, f"{name} vs fp64"


@pytest.mark.parametrize("m_dtype", [torch.float32, torch.bfloat16], ids=["m32", "m16b"])
@pytest.mark.parametrize("d_out", [1, 37, 2500])  # 2500: three programs, the last one ragged
def test_tail_vectors_kernel_matches_its_torch_ops(d_out, m_dtype, monkeypatch):
    """The one-launch TailVectors (m, n, s·m/n, s/n) against the same arithmetic in torch ops and fp64;
    its buffer poisoned first, and the kernel asserted to have run."""
    gen = torch.Generator().manual_seed(d_out)
    n = (torch.rand(d_out, generator=gen) + 0.5).to(DEVICE)
    m = (n * (1 + 0.1 * torch.randn(d_out, generator=gen).to(DEVICE))).to(m_dtype)
    s = 0.3  # not a power of two: sg and s/n round
    launched = []
    real_launch = FL._launch_tail_vectors
    monkeypatch.setattr(FL, "_launch_tail_vectors", lambda *a: launched.append(1) or real_launch(*a))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", _poisoned(real_empty))
    got = tail_vectors(m, n, s)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert launched == [1]
    monkeypatch.setattr(FL, "_tail_vectors_kernel_applies", lambda m, n: False)
    ops = tail_vectors(m, n, s)
    m64, n64 = m.double(), n.double()
    exact = {"m": m64, "n": n64, "sg": (m64 / n64 * s)[:, None], "s_over_n": s / n64}
    for name, want in exact.items():
        k, t = getattr(got, name), getattr(ops, name)
        assert k.dtype == t.dtype == torch.float32 and k.shape == t.shape == want.shape, name
        assert not torch.isnan(k).any(), f"{name}: unwritten elements"
        assert torch.equal(k, t), f"{name}: kernel differs from the torch ops"
        assert (k.double() - want).abs().max().item() <= 1e-6 * want.abs().max().item(), f"{name} vs fp64"
    m_before = m.clone()
    with torch.no_grad():
        m.mul_(2)  # an optimizer step after the forward: the vectors keep their own copy of m
    assert torch.equal(got.m, m_before.float())


def test_tail_vectors_of_a_tensor_subclass_take_the_torch_ops(monkeypatch):
    """A tensor subclass (FSDP2's DTensor, a functorch wrapper) has no storage to hand a kernel: its
    TailVectors come from the torch ops, with the same values."""
    class Wrapped(torch.Tensor):
        pass

    n = torch.rand(7, generator=torch.Generator().manual_seed(2)).to(DEVICE) + 0.5
    m = (n * 1.05).as_subclass(Wrapped)
    monkeypatch.setattr(FL, "_launch_tail_vectors", lambda *a: pytest.fail("kernel launched on a subclass"))
    got = tail_vectors(m, n, 0.5)
    assert torch.allclose(got.sg.reshape(-1).double(), (m.double() / n.double() * 0.5).as_subclass(torch.Tensor))


@pytest.mark.parametrize("args,error,match", [
    ((torch.ones(5), torch.ones(4), 0.5), ValueError, r"`m` has shape \(5,\).*expected d_out=4"),
    ((torch.ones(4, dtype=torch.int64), torch.ones(4), 0.5), TypeError, r"`m` has dtype torch.int64"),
    ((torch.ones(4), "n", 0.5), TypeError, r"`n` must be a torch.Tensor"),
    ((torch.ones(4), torch.ones(4), None), TypeError, r"`s` must be a Python float or int"),
    ((torch.ones(4), torch.ones(4, device="meta"), 0.5), ValueError, r"`n` is on meta but `m` is on cpu"),
], ids=["numel", "int-dtype", "not-a-tensor", "s-none", "devices"])
def test_tail_vectors_rejects_bad_input(args, error, match):
    """The public builder names the bad argument before any kernel reads past a shorter vector."""
    with pytest.raises(error, match=match):
        tail_vectors(*args)


@pytest.mark.parametrize("b_dtype", [torch.float32, torch.bfloat16], ids=["B32", "B16b"])
def test_tail_backward_writes_dB_over_a_consumed_P(b_dtype, monkeypatch):
    """consume_P: ∂B lands in P's own buffer when the dtypes match (one [d_out, r] buffer fewer at the
    backward's peak), with the values of the twin computed from the untouched P; otherwise a new one."""
    from dorafactors.dora_fused_naive import lora_b_tail_backward_reference

    gen = torch.Generator().manual_seed(41)
    d_out, r = 45, 21
    n = torch.rand(d_out, generator=gen, dtype=torch.float64).to(DEVICE) + 0.5
    tail = tail_vectors((n * 1.1).float(), n.float(), 0.75)
    P = torch.randn(d_out, r, generator=gen).to(DEVICE)
    B = torch.randn(d_out, r, generator=gen).to(DEVICE).to(b_dtype)
    pdm = torch.randn(3, d_out, generator=gen).to(DEVICE)
    ref = lora_b_tail_backward_reference(pdm, P, B, tail.sg, tail.s_over_n, tail.n, torch.bfloat16)
    monkeypatch.setattr(FL, "_TAIL_KERNEL_ON_CUDA", True)
    given = P.clone()
    d_m, dB, Bs = FL._tail_backward(pdm, given, B, tail, torch.bfloat16, True, True, consume_P=True)
    assert (dB.data_ptr() == given.data_ptr()) == (b_dtype == torch.float32)
    for name, got, want in (("d_m", d_m, ref[0]), ("dB", dB, ref[1]), ("Bs", Bs, ref[2])):
        assert got.dtype == want.dtype
        tol = 1e-5 if got.dtype == torch.float32 else 1e-2
        err = (got.double() - want.double()).abs().max().item()
        assert err <= tol * want.double().abs().max().item(), f"{name}: max err {err:.3g}"


@pytest.mark.parametrize("dtype,b_dtype,tol", [(torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.float32, 1e-2),
                                         (torch.bfloat16, torch.bfloat16, 1e-2), (torch.float16, torch.float32, 2e-3)],
                         ids=["fp32", "bf16-B32", "bf16", "fp16-B32"])
@pytest.mark.parametrize("shape_t,d_out,r,bias", [((37,), 45, 5, True), ((2, 17), 64, 40, False), ((1,), 1, 1, True)],
                         ids=["ragged-bias", "3d-r40", "one"])
def test_forward_kernel_matches_twin_and_fp64(shape_t, d_out, r, bias, dtype, b_dtype, tol, monkeypatch):
    """The one-kernel forward (lora_B's GEMM with the compose as its epilogue) into a poisoned output,
    against its twin and fp64; ragged T, d_out and r exercise every mask, and the [.., r] slices of a
    wider ax its row stride."""
    from dorafactors.dora_fused_naive import lora_b_compose_reference

    inputs = make(shape_t, d_out, r, dtype, bias, seed=d_out * 3 + r)
    wide_ax = make(shape_t, d_out, r + 3, dtype, False, seed=5)["ax"]
    ax = wide_ax[..., 2:2 + r]  # a strided view: rows r + 3 apart
    B = inputs["B"].to(b_dtype)
    tail = tail_vectors(inputs["m"], inputs["n"], 0.75)
    assert FL._fused_forward_applies(inputs["base"], ax, B, tail) == (dtype != torch.float32)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", _poisoned(real_empty))
    out = FL._shaped(FL._launch_lora_b_fwd(inputs["base"], ax, B, tail, 0.75, inputs["bias"]), inputs["base"].shape)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert out.shape == inputs["base"].shape and out.dtype == dtype and not torch.isnan(out).any()
    ref = lora_b_compose_reference(inputs["base"], ax, B, inputs["m"], inputs["n"], 0.75, inputs["bias"])
    exact = twin(*(t.double() if t is not None else None for t in (inputs["base"], ax, B.to(dtype), inputs["m"],
                                                                  inputs["n"])), 0.75,
                 inputs["bias"].double() if bias else None)
    scale = exact.abs().max().item()
    assert (out.double() - ref.double()).abs().max().item() <= tol * scale, "vs twin"
    assert (out.double() - exact).abs().max().item() <= tol * scale, "vs fp64"


@pytest.mark.parametrize("prefetch", [False, True], ids=["base-after-loop", "base-prefetched"])
def test_forward_kernel_base_prefetch_variants(prefetch, monkeypatch):
    """Both places the kernel may load the base tile (its PREFETCH_BASE config key: before the loop
    over r, or in the epilogue) give the twin's output, into a poisoned buffer, with a ragged r that
    takes several BLOCK_R steps."""
    from triton import Config

    from dorafactors.dora_fused_naive import lora_b_compose_reference

    factory, key, _configs, prune = FL._fused._registered["lora_b_fwd"]
    config = Config({"BLOCK_T": 16, "BLOCK_D": 32, "BLOCK_R": 16, "PREFETCH_BASE": prefetch})
    monkeypatch.setitem(FL._fused._registered, "lora_b_fwd", (factory, key, lambda *_: [config], prune))
    monkeypatch.setattr(FL._fused, "_tuned_cache", {})
    monkeypatch.setattr(FL._fused, "_chosen", {})
    inputs = make((19,), 40, 37, torch.bfloat16, True, seed=41)
    tail = tail_vectors(inputs["m"], inputs["n"], 0.5)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", _poisoned(real_empty))
    out = FL._launch_lora_b_fwd(inputs["base"], inputs["ax"], inputs["B"], tail, 0.5, inputs["bias"])
    monkeypatch.setattr(torch, "empty", real_empty)
    ref = lora_b_compose_reference(inputs["base"], inputs["ax"], inputs["B"], inputs["m"], inputs["n"], 0.5,
                                   inputs["bias"])
    assert not torch.isnan(out).any()
    assert (out.double() - ref.double()).abs().max().item() <= 1e-2 * ref.abs().max().item()


def test_forward_kernel_casting_b_first_is_bit_identical(monkeypatch):
    """From ``_CAST_B_MIN_R`` the kernel reads B cast to the activation dtype beforehand instead of
    rounding each tile itself: the same rounding (round-to-nearest-even, as autocast's), so on a GPU
    the same bits. Triton's interpreter truncates fp32 -> bf16 instead, so on the CPU only the cast
    path rounds B as autocast does and the two agree to one rounding of B."""
    inputs = make((23,), 33, 20, torch.bfloat16, True, seed=17)
    tail = tail_vectors(inputs["m"], inputs["n"], 0.5)
    B32 = torch.randn(33, 20, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 0.3  # PEFT's fp32 B
    args = (inputs["base"], inputs["ax"], B32, tail, 0.5, inputs["bias"])
    monkeypatch.setattr(FL, "_CAST_B_MIN_R", 1 << 20)
    in_kernel = FL._launch_lora_b_fwd(*args)
    monkeypatch.setattr(FL, "_CAST_B_MIN_R", 16)
    casts = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: casts.append(a) or real_to(t, *a, **k))
    cast_first = FL._launch_lora_b_fwd(*args)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert (torch.bfloat16,) in casts, "B was not cast before the launch"
    if FL._fused._interpreting():
        assert (in_kernel.float() - cast_first.float()).abs().max().item() <= 1e-2 * cast_first.abs().max().item()
    else:
        assert torch.equal(in_kernel, cast_first)


def test_forward_takes_one_kernel_and_fp32_fp64_keep_the_pair(monkeypatch):
    """Which forward ran: the one-kernel path for bf16/fp16 (no lora tensor, no compose launch),
    the GEMM + compose pair for fp32 and fp64."""
    calls = []
    real_compose, real_gemm = FL._launch_compose_fwd, FL._launch_lora_b_fwd
    monkeypatch.setattr(FL, "_launch_compose_fwd", lambda *a, **k: calls.append("pair") or real_compose(*a, **k))
    monkeypatch.setattr(FL, "_launch_lora_b_fwd", lambda *a, **k: calls.append("one") or real_gemm(*a, **k))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        inputs = make((5,), 24, 4, dtype, False, seed=3)
        compose_lora_b(**inputs, s=0.5)
    assert calls == ["one", "one", "pair", "pair"]


def test_forward_above_the_rank_cut_keeps_the_pair(monkeypatch):
    """Past ``_ONE_KERNEL_MAX_R`` cuBLAS's GEMM outruns the kernel (measured): bf16 then takes the
    GEMM + compose pair, and both paths give the same output."""
    calls = []
    real_compose, real_gemm = FL._launch_compose_fwd, FL._launch_lora_b_fwd
    monkeypatch.setattr(FL, "_launch_compose_fwd", lambda *a, **k: calls.append("pair") or real_compose(*a, **k))
    monkeypatch.setattr(FL, "_launch_lora_b_fwd", lambda *a, **k: calls.append("one") or real_gemm(*a, **k))
    monkeypatch.setattr(FL, "_ONE_KERNEL_MAX_R", 8)
    compose_lora_b(**make((6,), 20, 8, torch.bfloat16, True, seed=8), s=0.5)
    rank9 = make((6,), 20, 9, torch.bfloat16, True, seed=9)
    pair = compose_lora_b(**rank9, s=0.5)
    monkeypatch.setattr(FL, "_ONE_KERNEL_MAX_R", 9)
    one = compose_lora_b(**rank9, s=0.5)
    assert (one.double() - pair.double()).abs().max().item() <= 1e-2 * pair.abs().max().item()
    assert calls == ["one", "pair", "one"]


def test_tail_backward_twin_path_where_the_kernel_is_off(monkeypatch):
    """Compiled mode with the kernel switched off (CUDA's default until its GPU test passed): the
    twin computes exactly what it is asked for, nothing more."""
    from dorafactors.dora_fused_naive import lora_b_tail_backward_reference

    monkeypatch.setattr(FL, "_TAIL_KERNEL_ON_CUDA", False)
    monkeypatch.setattr(FL._fused, "_interpreting", lambda: False)
    gen = torch.Generator().manual_seed(11)
    n = torch.rand(9, generator=gen) + 0.5
    tail = tail_vectors(n * 1.1, n, 0.5)
    P, B, pdm = torch.randn(9, 4, generator=gen), torch.randn(9, 4, generator=gen), torch.randn(3, 9, generator=gen)
    d_m, dB, Bs = FL._tail_backward(pdm, P, B, tail, torch.bfloat16, False, True)
    ref = lora_b_tail_backward_reference(pdm, P, B, tail.sg, tail.s_over_n, tail.n, torch.bfloat16)
    assert dB is None and torch.equal(d_m, ref[0]) and torch.equal(Bs, ref[2])


def test_autocast_casts_B_as_the_explicit_path_does():
    """Under autocast F.linear casts the fp32 B itself: same output and gradients as the explicit cast."""
    inputs = make((6,), 20, 4, torch.bfloat16, False, seed=12)
    dy = torch.randn(6, 20, generator=torch.Generator().manual_seed(13)).to(DEVICE, torch.bfloat16)
    results = []
    for use_autocast in (False, True):
        B32 = inputs["B"].float().clone().requires_grad_(True)
        ax = inputs["ax"].clone().requires_grad_(True)
        m = inputs["m"].clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=use_autocast):
            out = compose_lora_b(inputs["base"], ax, B32, m, inputs["n"], 0.5)
        out.backward(dy)
        results.append((out.detach(), B32.grad, ax.grad, m.grad))
    for name, a, b in zip(("out", "dB", "dax", "dm"), *results):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs under autocast"


@pytest.mark.parametrize("change,error,words", [
    (dict(B=torch.zeros(5, 4)), ValueError, "`base` has shape"),
    (dict(ax=torch.zeros(6, 3)), ValueError, "`ax` has shape"),
    (dict(ax=torch.zeros(7, 4)), ValueError, "`ax` has shape"),
    (dict(m=torch.ones(5)), ValueError, "`m` has shape"),
    (dict(bias=torch.ones(3)), ValueError, "`bias` has shape"),
    (dict(B=torch.zeros(16, 4, dtype=torch.int32)), TypeError, "`B` has dtype torch.int32"),
    (dict(n=[1.0] * 16), TypeError, "`n` must be a torch.Tensor"),
    (dict(s="0.5"), TypeError, "`s` must be a Python float"),
    (dict(B=torch.zeros(16)), ValueError, "`B` must be [d_out, r]"),
    (dict(tail=(1, 2)), ValueError, "`tail` must be tail_vectors"),
], ids=["B-rows", "ax-rank", "ax-tokens", "m", "bias", "B-dtype", "n-list", "s-str", "B-1d", "tail"])
def test_compose_lora_b_rejects_bad_inputs(change, error, words):
    """The public entry names the argument and what it expected (never a crash inside a kernel)."""
    kwargs = dict(base=torch.zeros(6, 16), ax=torch.zeros(6, 4), B=torch.zeros(16, 4), m=torch.ones(16),
                  n=torch.ones(16), s=0.5, bias=None, tail=None)
    kwargs.update(change)
    with pytest.raises(error, match=re.escape(words)):
        compose_lora_b(**kwargs)


def test_single_token_rows_with_a_transposed_dy():
    """[B, 1, d] tensors count as contiguous whatever the size-1 dimension's stride: the kernels must
    still step d_out per row (a transposed dy has stride(-2) = 1 there)."""
    inputs = make((4, 1), 10, 3, torch.float32, True, seed=21)
    w = torch.randn(4, 10, 1, generator=torch.Generator().manual_seed(22)).to(DEVICE)

    def output_and_grads(fn):
        leaves = {k: v.detach().clone().requires_grad_(k != "n") for k, v in inputs.items()}
        out = fn(leaves["base"], leaves["ax"], leaves["B"], leaves["m"], leaves["n"], 0.5, leaves["bias"])
        (out.transpose(1, 2) * w.transpose(1, 2)).sum().backward()
        return out.detach(), {k: leaves[k].grad for k in ("base", "ax", "B", "m", "bias")}

    got, ref = output_and_grads(compose_lora_b), output_and_grads(twin)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for k in ref[1]:
        torch.testing.assert_close(got[1][k], ref[1][k], rtol=1e-5, atol=1e-5, msg=f"d_{k}")


def test_tail_twin_without_P_when_only_ax_needs_a_gradient(monkeypatch):
    """Frozen B and m, trainable A (or x): CUDA's twin path gets no P and must not touch it."""
    monkeypatch.setattr(FL, "_TAIL_KERNEL_ON_CUDA", False)
    monkeypatch.setattr(FL._fused, "_interpreting", lambda: False)
    n = torch.rand(7) + 0.5
    tail = tail_vectors(n * 1.2, n, 0.5)
    B = torch.randn(7, 3)
    d_m, dB, Bs = FL._tail_backward(None, None, B, tail, torch.float32, False, True)
    assert d_m is None and dB is None
    torch.testing.assert_close(Bs, B * tail.sg)
