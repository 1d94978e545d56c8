"""Dispatch: each PEFT_DORA_FUSED / PEFT_DORA_FUSED_BACKWARD setting takes the path it claims
(asserted on which path ran, not on timing), and the fused path through a PEFT model matches eager.
Kernels run on the CPU through Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides at import whether @jit builds interpreted kernels: set the interpreter first
_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
if _previous is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous

from peft import LoraConfig, get_peft_model  # noqa: E402

from dora_testing import assert_close, ours, ours_env, use_impl  # noqa: E402


# On a GPU machine the kernels run natively on CUDA tensors; on a CPU one through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def interpreter(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def spy(monkeypatch):
    """Records each fused call: "lora_b" (lora_B's GEMM inside the Function, the layer's path for a
    plain lora_B) or "compose" (the compose alone; True when v is recovered from the output)."""
    package = ours().__name__.rsplit(".", 1)[0]
    fused = __import__(package + ".dora_fused", fromlist=["compose_trusted"])
    fused_linear = __import__(package + ".dora_fused_linear", fromlist=["compose_lora_b_trusted"])
    calls = []
    real_compose, real_lora_b = fused.compose_trusted, fused_linear.compose_lora_b_trusted

    def counting_compose(*args, **kwargs):
        calls.append(("compose", kwargs.get("save_out_for_mag_grad", False)))
        return real_compose(*args, **kwargs)

    def counting_lora_b(*args, **kwargs):
        calls.append(("lora_b", False))
        return real_lora_b(*args, **kwargs)

    monkeypatch.setattr(fused, "compose_trusted", counting_compose)
    monkeypatch.setattr(fused_linear, "compose_lora_b_trusted", counting_lora_b)
    return calls


def tiny_model(bias=False, dropout=0.0):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 20, bias=bias), torch.nn.GELU(), torch.nn.Linear(20, 9, bias=bias))
    with use_impl("ours"):
        model = get_peft_model(base, LoraConfig(r=3, target_modules=["0", "2"], use_dora=True, init_lora_weights=False,
                                                lora_dropout=dropout))
    return model.to(DEVICE)


def run(model, x):
    out = model(x)
    out.backward(torch.ones_like(out))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["nodrop", "dropout"])
def test_forced_fused_matches_eager_and_runs_kernels(interpreter, spy, bias, dropout):
    env = ours_env()
    model = tiny_model(bias, dropout)
    model.train()
    x = torch.randn(2, 5, 12, device=DEVICE)
    with env.config_override(fused=False):
        torch.manual_seed(3)
        eager_out, eager_grads = run(model, x)
    assert spy == []
    with env.config_override(fused=True, fused_backward=True):
        torch.manual_seed(3)
        fused_out, fused_grads = run(model, x)
    assert len(spy) == 2, "both adapted layers must run the fused compose"
    # lora_B's GEMM runs inside the Function (∂m from the saved base and P = dyᵀ·ax), never from
    # v recovered out of the rounded output
    assert spy == [("lora_b", False), ("lora_b", False)]
    assert_close(fused_out, eager_out, atol=1e-5, rtol=1e-4, name="output")
    for k in eager_grads:
        assert_close(fused_grads[k], eager_grads[k], atol=1e-5, rtol=1e-4, name=k)


@pytest.mark.skipif(DEVICE == "cuda", reason="auto picks the fused path on CUDA")
def test_auto_on_cpu_stays_eager(interpreter, spy):
    with ours_env().config_override(fused=None):
        run(tiny_model(), torch.randn(4, 12, device=DEVICE))
    assert spy == []


def test_fused_backward_off_uses_eager_for_training(interpreter, spy):
    with ours_env().config_override(fused=True, fused_backward=False):
        model = tiny_model()
        run(model, torch.randn(4, 12, device=DEVICE))
        assert spy == []
        with torch.no_grad():
            model(torch.randn(4, 12, device=DEVICE))
    assert len(spy) == 2  # inference still fused


def test_forced_fused_without_triton_raises_clear_error(monkeypatch, spy):
    fused = __import__(ours().__name__.rsplit(".", 1)[0] + ".dora_fused", fromlist=["is_available"])
    monkeypatch.setattr(fused, "is_available", lambda: False)
    model = tiny_model()
    with ours_env().config_override(fused=True):
        with pytest.raises(RuntimeError, match="PEFT_DORA_FUSED=1.*cannot run"):
            model(torch.randn(2, 12, device=DEVICE))


def test_env_variable_drives_dispatch(interpreter, spy, monkeypatch):
    model = tiny_model()
    monkeypatch.setenv("PEFT_DORA_FUSED", "0")
    with torch.no_grad():
        model(torch.randn(2, 12, device=DEVICE))
    assert spy == []
    monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    with torch.no_grad():
        model(torch.randn(2, 12, device=DEVICE))
    assert len(spy) == 2
