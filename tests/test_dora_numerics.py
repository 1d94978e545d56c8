"""Numerics: the factored norm against fp64 dense norms (hypothesis), the near-unity regime,
zero-norm rows, and the bound on temporaries of the norm path (measured, not trusted)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from dora_testing import assert_close, ours, rel_rms
from test_dora_layers import make_linear_case, run_linear


def dense_norm64(W, A, B, s):
    return torch.linalg.norm(W.double() + s * B.double() @ A.double(), dim=1)


@settings(max_examples=40, deadline=None)
@given(
    d_out=st.integers(1, 70),
    d_in=st.integers(1, 70),
    r=st.integers(1, 90),
    scaling=st.floats(0.01, 8.0),
    b_scale=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_factored_norm_matches_dense_fp64(d_out, d_in, r, scaling, b_scale, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    B = b_scale * torch.randn(d_out, r, generator=g, dtype=torch.float64)
    n = ours().factored_row_norm(W, A, B, scaling, chunk_bytes=1)  # one row per chunk: exercises chunking
    expected = dense_norm64(W, A, B, scaling).clamp_min(ours().DORA_NORM_EPS)
    # the expansion loses ~ (scale of the terms)·eps where the norm cancels; bound accordingly
    terms = W.square().sum(1) + (scaling * B @ A).square().sum(1)
    atol = 1e-12 * (1 + terms.max().sqrt().item())
    assert_close(n, expected, atol=atol, rtol=1e-10, name="factored vs dense")


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 9), d_in=st.integers(1, 24), d_out=st.integers(1, 24), r=st.integers(1, 12),
       scaling=st.floats(0.05, 4.0), seed=st.integers(0, 2**16))
def test_layer_matches_reference_fp64_property(reference, T, d_in, d_out, r, scaling, seed):
    torch.manual_seed(seed)
    case = make_linear_case((T, d_in, d_out, r), scaling=scaling)
    a, ga, _, dy = run_linear(reference.DoraLinearLayer, case, torch.float64)
    b, gb, _, _ = run_linear(ours().DoraLinearLayer, case, torch.float64, dy=dy)
    assert_close(b, a, atol=1e-12, rtol=1e-10, name="output")
    for k in ga:
        assert_close(gb[k], ga[k], atol=1e-12, rtol=1e-10, name=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_near_unity_ours_closer_to_fp64_than_reference(reference, dtype):
    """g = m/n within ~1e-3 of 1 (B small, m = n(1 + δ)): upstream rounds g to the activation dtype
    before forming g − 1 and loses most of δ; (m − n)/n in fp32 keeps it."""
    torch.manual_seed(0)
    case = make_linear_case((48, 64, 96, 8), b_scale=1e-3, scaling=1.0)
    _, _, m0, _ = run_linear(reference.DoraLinearLayer, case, torch.float64)
    m = m0 * (1 + 1e-3 * torch.randn_like(m0))
    truth, _, _, dy = run_linear(reference.DoraLinearLayer, case, torch.float64, magnitude=m)
    base = case["base"].double()(case["x"].double())
    ours_out, _, _, _ = run_linear(ours().DoraLinearLayer, case, dtype, magnitude=m, dy=dy)
    ref_out, _, _, _ = run_linear(reference.DoraLinearLayer, case, dtype, magnitude=m, dy=dy)
    # judge the DoRA correction itself (output minus base), where the regime matters
    ours_err = rel_rms(ours_out.double() - base, truth - base)
    ref_err = rel_rms(ref_out.double() - base, truth - base)
    assert ours_err < ref_err, f"ours {ours_err:.3e} vs reference {ref_err:.3e}"


def test_zero_norm_rows_are_finite(reference):
    """Rows with W_i + s(BA)_i = 0 give inf/NaN upstream (peft issue 2049); ours stay finite."""
    case = make_linear_case((5, 8, 6, 2))
    with torch.no_grad():
        case["base"].weight[2].zero_()
        case["base"].weight[4].zero_()
        case["lora_B"].weight[2].zero_()
        case["lora_B"].weight[4].zero_()
    out, grads, m, _ = run_linear(ours().DoraLinearLayer, case, torch.float32)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert m[2] == 0 and m[4] == 0
    assert_close(out[:, 2], case["base"].bias[2].detach().expand(5), atol=1e-6, rtol=0, name="zero row output")
    ref_out, _, _, _ = run_linear(reference.DoraLinearLayer, case, torch.float32)
    assert not torch.isfinite(ref_out).all(), "the reference should show the bug this test guards"


class _AllocationTracker(TorchDispatchMode):
    """Records the element count of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            # views and detached aliases share an input's storage and allocate nothing
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_norm_path_never_allocates_dense_temporary(dtype):
    d_out, d_in, r = 512, 384, 16
    W = torch.randn(d_out, d_in, dtype=dtype)
    A, B = torch.randn(r, d_in), torch.randn(d_out, r)
    chunk = 64 * 1024  # bytes: forces ~21 rows per chunk
    with _AllocationTracker() as tracker:
        ours().factored_row_norm(W, A, B, 0.5, chunk_bytes=chunk)
    dense_bytes = d_out * d_in * W.element_size()
    assert tracker.largest <= chunk, (tracker.largest, chunk)
    assert tracker.largest < dense_bytes / 8
    # and the tracker does see a dense product when one is built
    with _AllocationTracker() as tracker:
        torch.linalg.norm(W.float() + B @ A, dim=1)
    assert tracker.largest >= d_out * d_in * 4


def test_norm_chunk_env_bounds_layer_forward(monkeypatch):
    """Through the layer: PEFT_DORA_NORM_CHUNK_MB=16 bounds temporaries at a shape where W is 64 MiB."""
    monkeypatch.setenv("PEFT_DORA_NORM_CHUNK_MB", "16")
    d_out, d_in, r = 4096, 4096, 8
    W = torch.randn(d_out, d_in)
    A, B = torch.randn(r, d_in), torch.randn(d_out, r)
    with _AllocationTracker() as tracker:
        ours().factored_row_norm(W, A, B, 1.0)
    assert tracker.largest <= 16 * 1024 * 1024 < d_out * d_in * 4
