"""QDoRA: DoRA over quantized base weights (bitsandbytes 4-bit / 8-bit on its CPU backend; torchao
int8 and HQQ where installed), ours against upstream PEFT's QDoRA on the same quantized weights.

Checks: row chunks of the dequantized weight match PEFT's whole-weight helper bit for bit (ragged
shapes, chunks that cut quantization blocks); outputs and gradients of x, A, B, m against upstream
(fp32 tight; bf16 no worse than upstream against an fp64 truth built on the same quantized
values); the dropout path; one dequantization per gradient-accumulation window and never PEFT's
whole-weight helper in the forward; adapters moving between quantized and unquantized bases;
PEFT's own errors for quantizations it does not allow with DoRA.
"""

from __future__ import annotations

import copy
import importlib
import inspect

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from dora_testing import DTYPE_IDS, TOLS, assert_close, ours, ours_env, rel_rms, use_impl

bnb = pytest.importorskip("bitsandbytes")

D_IN, D_MID, D_OUT = 97, 41, 30  # d_out · d_in not a multiple of the 64-element 4-bit block: ragged
KINDS = ["nf4", "fp4", "nf4-dq", "fp4-dq", "int8"]


def quant_mod():
    """``dora_quant`` next to the DoRA module under test (plugin or patched tree)."""
    return importlib.import_module(ours().__name__.rsplit(".", 1)[0] + ".dora_quant")


class Tiny(nn.Module):
    def __init__(self, d_in=D_IN, d_mid=D_MID, d_out=D_OUT):
        super().__init__()
        self.a = nn.Linear(d_in, d_mid)
        self.b = nn.Linear(d_mid, d_out, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def quantize_linear(lin: nn.Linear, kind: str, compute_dtype: torch.dtype, device="cpu") -> nn.Module:
    bias = lin.bias is not None
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False, threshold=0.0)
    else:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=kind.endswith("-dq"), quant_type=kind[:3])
        # quantized from weights in the model dtype, as transformers loads them (quant_state.dtype)
        q = q.to(lin.weight.dtype)
    q.load_state_dict(lin.state_dict())
    return q.to(device)  # bitsandbytes quantizes when the layer is moved to its device


def quantize_model(dense: Tiny, kind: str, device="cpu") -> Tiny:
    model = copy.deepcopy(dense)
    dtype = model.a.weight.dtype
    for name in ("a", "b"):
        setattr(model, name, quantize_linear(getattr(model, name), kind, dtype, device))
    # what transformers sets on a model loaded in 4/8 bit: PEFT dispatches to its bnb LoRA layers on it
    setattr(model, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    return model


def dequantized_copy(qmodel: Tiny, dense: Tiny, dtype=torch.float64) -> Tiny:
    """An unquantized Tiny holding exactly the quantized model's dequantized values."""
    from peft.utils.integrations import dequantize_module_weight

    model = copy.deepcopy(dense).to(device=next(qmodel.parameters()).device, dtype=dtype)
    with torch.no_grad():
        for name in ("a", "b"):
            layer = getattr(qmodel, name)
            layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            getattr(model, name).weight.copy_(dequantize_module_weight(layer).to(dtype))
    return model


def dora_cfg(**kw):
    cfg = dict(r=4, lora_alpha=8, target_modules=["a", "b"], use_dora=True, init_lora_weights=False)
    cfg.update(kw)
    return LoraConfig(**cfg)


def peft_model(impl, base, **kw):
    with use_impl(impl):
        return get_peft_model(base, dora_cfg(**kw))


def perturb_adapters(pm, seed=7):
    """Random A, B and a magnitude away from its init (so g != 1): every term of DoRA matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype))
            elif "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5).to(device=p.device, dtype=p.dtype))


def copy_adapters(src, dst):
    sd = {k: v.to(next(dst.parameters()).device) for k, v in get_peft_model_state_dict(src).items()}
    result = set_peft_model_state_dict(dst, sd)
    assert not getattr(result, "unexpected_keys", []), result.unexpected_keys


def run(pm, x, dy, seed=3):
    """Output and gradients of x and every adapter parameter (dropout masks drawn from ``seed``)."""
    device = next(pm.parameters()).device
    x = x.to(device).requires_grad_(True)
    torch.manual_seed(seed)
    y = pm(x)
    y.backward(dy.to(device=device, dtype=y.dtype))
    grads = {"x": x.grad}
    grads.update({n.replace("base_model.model.", ""): p.grad for n, p in pm.named_parameters() if p.requires_grad})
    assert all(g is not None for g in grads.values()), [k for k, g in grads.items() if g is None]
    return y.detach(), grads


def pair(kind, dtype=torch.float32, device="cpu", **kw):
    """Upstream's and our QDoRA on the same quantized weights (quantization is deterministic) with
    the same adapters."""
    torch.manual_seed(0)
    dense = Tiny().to(dtype)
    up = peft_model("reference", quantize_model(dense, kind, device), **kw)
    ours_pm = peft_model("ours", quantize_model(dense, kind, device), **kw)
    perturb_adapters(ours_pm)
    copy_adapters(ours_pm, up)
    return dense, up, ours_pm


def inputs(dtype, T=6, d_in=D_IN, d_out=D_OUT):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    dy = torch.randn(T, d_out, generator=gen, dtype=torch.float64)
    return x, dy


# ---------------------------------------------------------------------------------------------
# row chunks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_row_chunks_equal_peft_dequantize(kind, dtype):
    """Every row range (3 rows: chunks cut 4-bit blocks mid-way) equals PEFT's whole-weight dequant."""
    from peft.utils.integrations import dequantize_module_weight

    layer = quantize_linear(nn.Linear(D_IN, D_MID).to(dtype), kind, dtype)
    whole = dequantize_module_weight(layer)
    src = quant_mod().quant_rows(layer)
    assert src.kind == ("bnb8" if kind == "int8" else "bnb4")
    assert tuple(src.shape) == tuple(whole.shape) and src.dtype == whole.dtype
    row_sq = src.row_sq  # asked for before the pass: filled by it
    for start in range(0, D_MID, 3):
        assert torch.equal(src[start : start + 3], whole[start : start + 3]), f"rows {start}:{start + 3}"
    assert_close(row_sq, whole.double().square().sum(1), atol=1e-6, rtol=1e-5, name="row_sq")


@pytest.mark.parametrize("kind", KINDS)
def test_factored_norm_on_quantized_rows_fp64_exact(kind):
    """The factored norm over a quantized W (small chunks) equals the dense fp64 norm of its values."""
    layer = quantize_linear(nn.Linear(D_IN, D_MID), kind, torch.float32)
    W = quant_mod().quant_rows(layer)[0:D_MID].double()
    A, B = torch.randn(5, D_IN, dtype=torch.float64), torch.randn(D_MID, 5, dtype=torch.float64)
    src = quant_mod().quant_rows(layer)
    # the fp64 adapters promote the GEMM to fp64, so the only difference is summation order
    n = ours().factored_row_norm(src, A, B, 0.6, base_sq=src.row_sq, chunk_bytes=8 * D_IN * 3)
    assert_close(n, torch.linalg.norm(W + 0.6 * B @ A, dim=1), atol=1e-6, rtol=1e-6, name="norm")


def test_8bit_layer_with_fp16_weights_uses_them():
    """``has_fp16_weights=True`` keeps the real weights in the layer: the rows are those (PEFT's
    helper would try to dequantize them without row scales)."""
    lin = nn.Linear(D_IN, D_MID)
    q = bnb.nn.Linear8bitLt(D_IN, D_MID, has_fp16_weights=True)
    q.load_state_dict(lin.state_dict())
    src = quant_mod().quant_rows(q.to("cpu"))
    assert src.dtype == torch.float32 and torch.equal(src[0:D_MID], lin.weight.data)


def test_4bit_weights_repacked_for_the_cpu_kernels_are_read_through_the_layer(monkeypatch):
    """On CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights in eval: rows then come from the
    layer's own kernel (simulated here: the flag set, the layer's forward a dense one)."""
    lin = nn.Linear(D_IN, D_MID)
    q = quantize_linear(lin, "nf4", torch.float32)
    monkeypatch.setattr(q.weight.quant_state, "packing_format_for_cpu", True, raising=False)
    monkeypatch.setattr(q, "forward", lin.forward)
    src = quant_mod().quant_rows(q)
    assert_close(src[3:17], lin.weight.detach()[3:17], atol=1e-6, rtol=1e-5, name="rows via the layer")


def test_unquantized_4bit_layer_gets_a_clear_error():
    layer = bnb.nn.Linear4bit(D_IN, D_MID, compute_dtype=torch.float32)  # never moved: not quantized
    layer.weight.quant_state = None
    with pytest.raises(ValueError, match="not quantized yet"):
        quant_mod().quant_rows(layer)


# ---------------------------------------------------------------------------------------------
# against upstream
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["base-result", "dropout-path"])
def test_fp32_matches_upstream(kind, dropout):
    _, up, pm = pair(kind, lora_dropout=dropout)
    layer = pm.base_model.model.a.lora_magnitude_vector["default"]
    assert hasattr(layer, "row_norm"), type(layer)
    assert type(pm.base_model.model.a).__name__ == ("Linear8bitLt" if kind == "int8" else "Linear4bit")
    up.train(dropout > 0)
    pm.train(dropout > 0)
    x, dy = inputs(torch.float32)
    y_up, g_up = run(up, x, dy)
    y, g = run(pm, x, dy)
    tol = TOLS[torch.float32]
    assert_close(y, y_up, atol=tol.atol, rtol=tol.rtol, name="output")
    assert g.keys() == g_up.keys()
    for k in g:
        assert_close(g[k], g_up[k], atol=tol.atol, rtol=tol.rtol, name=f"grad {k}")


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("kind", ["nf4", "fp4-dq", "int8"])
def test_bf16_error_no_larger_than_upstream(kind, device):
    """bf16 model, PEFT's fp32 adapters: error against an fp64 run of the same quantized values
    (on the GPU through bitsandbytes' CUDA kernels)."""
    dense, up, pm = pair(kind, dtype=torch.bfloat16, device=device)
    truth_pm = peft_model("reference", dequantized_copy(pm.base_model.model, dense))
    copy_adapters(pm, truth_pm)
    truth_pm.double()
    x, dy = inputs(torch.bfloat16, T=32)
    y64, g64 = run(truth_pm, x.double(), dy)
    y_up, g_up = run(up, x, dy)
    y, g = run(pm, x, dy)
    assert y.dtype == y_up.dtype
    bound = 2 * torch.finfo(torch.bfloat16).eps
    for key, a, b, t in [("output", y, y_up, y64)] + [(f"grad {k}", g[k], g_up[k], g64[k]) for k in g64]:
        ours_err, up_err = rel_rms(a, t), rel_rms(b, t)
        assert ours_err <= max(1.1 * up_err, bound), f"{key}: ours {ours_err:.3e} vs upstream {up_err:.3e}"


def test_quantized_equals_dense_base_with_dequantized_values():
    """Same adapters on the quantized base and on a dense base holding its values: same output."""
    dense, _, pm = pair("nf4")
    dense_pm = peft_model("ours", dequantized_copy(pm.base_model.model, dense, torch.float32))
    copy_adapters(pm, dense_pm)
    x, _ = inputs(torch.float32)
    with torch.no_grad():
        assert_close(pm(x), dense_pm(x), atol=1e-5, rtol=1e-4, name="quantized vs dense base")


# ---------------------------------------------------------------------------------------------
# caching: one dequantization per accumulation window, never PEFT's whole-weight helper
# ---------------------------------------------------------------------------------------------


def test_one_dequantization_per_accumulation_window(monkeypatch):
    _, _, pm = pair("nf4-dq")
    pm.train()
    dq = quant_mod()
    rows_read = []
    real_rows = dq._Bnb4bitRows._rows
    monkeypatch.setattr(dq._Bnb4bitRows, "_rows", lambda self, a, b: rows_read.append(b - a) or real_rows(self, a, b))

    def forbidden(*args, **kwargs):
        raise AssertionError("the forward dequantized the whole weight through PEFT's helper")

    monkeypatch.setattr(ours(), "dequantize_module_weight", forbidden)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x, dy = inputs(torch.float32)
    rows_per_pass = D_MID + D_OUT  # every row of both layers once
    for window in range(2):
        for _ in range(4):  # micro-batches, each forward recomputed by gradient checkpointing
            y = checkpoint(pm, x, use_reentrant=False)
            y.backward(dy.to(y.dtype))
        assert sum(rows_read) == (window + 1) * rows_per_pass, f"window {window}: {sum(rows_read)} rows read"
        opt.step()
        opt.zero_grad()
    # the cached norm is the fresh one
    with ours_env().config_override(norm_cache=False), torch.no_grad():
        fresh = pm(x)
    with torch.no_grad():
        assert_close(pm(x), fresh, atol=1e-6, rtol=1e-5, name="cached vs fresh after steps")


def test_cache_off_also_reads_each_row_once(monkeypatch):
    _, _, pm = pair("int8")
    dq = quant_mod()
    rows_read = []
    real_rows = dq._Bnb8bitRows._rows
    monkeypatch.setattr(dq._Bnb8bitRows, "_rows", lambda self, a, b: rows_read.append(b - a) or real_rows(self, a, b))
    x, _ = inputs(torch.float32)
    with ours_env().config_override(norm_cache=False), torch.no_grad():
        pm(x)
        pm(x)
    assert sum(rows_read) == 2 * (D_MID + D_OUT)


def test_interrupted_norm_pass_leaves_no_partial_base_term(monkeypatch):
    _, _, pm = pair("nf4")
    x, _ = inputs(torch.float32)
    dq = quant_mod()
    real_rows = dq._Bnb4bitRows._rows

    def failing(self, a, b):
        raise KeyboardInterrupt  # e.g. a user interrupt in the middle of the pass

    monkeypatch.setattr(dq._Bnb4bitRows, "_rows", failing)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        pm(x)
    monkeypatch.setattr(dq._Bnb4bitRows, "_rows", real_rows)
    with torch.no_grad():
        cached = pm(x)
        with ours_env().config_override(norm_cache=False):
            assert_close(cached, pm(x), atol=1e-6, rtol=1e-5, name="after an interrupted pass")


def test_cache_key_follows_the_quantized_storage():
    """A new quantized weight (a merge or a reload swaps it) invalidates the base term."""
    _, _, pm = pair("nf4")
    x, _ = inputs(torch.float32)
    with torch.no_grad():
        pm(x)
        layer = pm.base_model.model.a
        key = layer.lora_magnitude_vector["default"]._norm_cache.base_key
        other = quantize_linear(nn.Linear(D_IN, D_MID), "nf4", torch.float32)
        layer.base_layer.weight = other.weight
        out = pm(x)
        assert layer.lora_magnitude_vector["default"]._norm_cache.base_key != key
        with ours_env().config_override(norm_cache=False):
            assert_close(out, pm(x), atol=1e-6, rtol=1e-5, name="after swapping the quantized weight")


class _LargestAllocation(TorchDispatchMode):
    """Bytes of the largest new storage any op returns (views of inputs allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_norm_allocates_row_chunks_only(kind):
    d_out, d_in = 512, 384
    layer = quantize_linear(nn.Linear(d_in, d_out), kind, torch.float32)
    A, B = torch.randn(16, d_in), torch.randn(d_out, 16)
    chunk = 64 * 1024  # bytes: ~21 rows of W per chunk
    src = quant_mod().quant_rows(layer)
    with _LargestAllocation() as tracker:
        ours().factored_row_norm(src, A, B, 0.5, base_sq=src.row_sq, chunk_bytes=chunk)
    assert tracker.largest <= chunk < d_out * d_in * 4 / 8, tracker.largest


def test_training_step_makes_no_fp32_copy_of_w():
    """A whole forward and backward through PEFT's 4-bit layer (bf16 compute, fp32 adapters, as
    QLoRA): nothing as large as W in fp32 is allocated by ours; upstream's dense detour is."""
    d_out, d_in = 2048, 2048  # W in fp32: 16 MiB, the smallest norm chunk bound PEFT_DORA_NORM_CHUNK_MB allows
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(d_in, d_out, bias=False)).to(torch.bfloat16)
    largest = {}
    for impl in ("ours", "reference"):
        model = copy.deepcopy(dense)
        model[0] = quantize_linear(model[0], "nf4", torch.bfloat16)
        model.is_loaded_in_4bit = True
        pm = peft_model(impl, model, target_modules=["0"])
        x = torch.randn(4, d_in, dtype=torch.bfloat16, requires_grad=True)
        with ours_env().config_override(norm_chunk_mb=16), _LargestAllocation() as tracker:
            pm(x).float().square().sum().backward()
        largest[impl] = tracker.largest
    w_fp32 = d_out * d_in * 4
    assert largest["ours"] < w_fp32 <= largest["reference"], largest


# ---------------------------------------------------------------------------------------------
# adapters move between quantized and unquantized bases
# ---------------------------------------------------------------------------------------------


def _adapter_sd(pm):
    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(pm).items()}


def _assert_same_sd(a, b, what):
    assert a.keys() == b.keys(), f"{what}: keys differ {sorted(set(a) ^ set(b))}"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_adapter_round_trip_quantized_dense_quantized(tmp_path, kind):
    dense, _, pm = pair(kind)
    saved = _adapter_sd(pm)
    assert any(k.endswith("lora_magnitude_vector") for k in saved), sorted(saved)  # upstream's on-disk key
    pm.save_pretrained(tmp_path / "q")
    with use_impl("ours"):
        on_dense = PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path / "q")
    _assert_same_sd(_adapter_sd(on_dense), saved, "quantized -> dense")
    on_dense.save_pretrained(tmp_path / "d")
    with use_impl("ours"):
        back = PeftModel.from_pretrained(quantize_model(dense, kind), tmp_path / "d")
    _assert_same_sd(_adapter_sd(back), saved, "dense -> quantized")
    with use_impl("reference"):  # upstream reads our quantized-base adapter as its own
        up = PeftModel.from_pretrained(quantize_model(dense, kind), tmp_path / "q")
    _assert_same_sd(_adapter_sd(up), saved, "ours -> upstream")
    x, _ = inputs(torch.float32)
    pm.eval()  # as from_pretrained leaves `back` (bitsandbytes' 8-bit matmul differs between modes)
    with torch.no_grad():
        assert_close(back(x), pm(x), atol=1e-6, rtol=1e-5, name="reloaded quantized model")


# ---------------------------------------------------------------------------------------------
# combinations PEFT rejects keep PEFT's error
# ---------------------------------------------------------------------------------------------


def _peft_layer(path):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", ["peft.tuners.lora.awq:AwqLoraLinear", "peft.tuners.lora.aqlm:AqlmLoraLinear",
                                  "peft.tuners.lora.gptq:GPTQLoraLinear"])
def test_peft_rejects_dora_on_these_quantizations(path):
    cls = _peft_layer(path)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {"config": dora_cfg(r=2)} if "config" in params else {"r": 2, "use_dora": True}
    with use_impl("ours"), pytest.raises(ValueError, match="does not support DoRA"):
        cls(nn.Linear(8, 8), "default", **kwargs)


def test_mixed_adapter_batches_keep_peft_error():
    _, _, pm = pair("nf4")
    pm.eval()
    x, _ = inputs(torch.float32)
    with pytest.raises(ValueError, match="DoRA"):
        pm(x, adapter_names=["default"] * x.shape[0])


# ---------------------------------------------------------------------------------------------
# torchao int8 weight-only and HQQ (when installed)
# ---------------------------------------------------------------------------------------------


def _other_pair(kind):
    torch.manual_seed(0)
    dense = Tiny(128, 64, 32).to(torch.bfloat16)  # HQQ needs group-size-divisible weights

    def quantized():  # built twice: HQQ layers cannot be deep-copied
        qmodel = copy.deepcopy(dense)
        if kind == "torchao":
            torchao_q = pytest.importorskip("torchao.quantization")
            torchao_q.quantize_(qmodel, torchao_q.Int8WeightOnlyConfig())
            return qmodel
        hqq = pytest.importorskip("hqq.core.quantize")
        for name in ("a", "b"):
            cfg = hqq.BaseQuantizeConfig(nbits=4, group_size=64)
            setattr(qmodel, name, hqq.HQQLinear(getattr(qmodel, name), quant_config=cfg,
                                                compute_dtype=torch.bfloat16, device="cpu", del_orig=False))
        return qmodel

    up = peft_model("reference", quantized())
    pm = peft_model("ours", quantized())
    perturb_adapters(pm)
    copy_adapters(pm, up)
    return up, pm


@pytest.mark.parametrize("kind", ["torchao", "hqq"])
def test_other_quantizations_match_upstream(kind):
    up, pm = _other_pair(kind)
    src = quant_mod().quant_rows(pm.base_model.model.a.get_base_layer())
    assert src is not None and src.kind == kind
    x, dy = inputs(torch.bfloat16, d_in=128, d_out=32)
    y_up, g_up = run(up, x, dy)
    y, g = run(pm, x, dy)
    # both compute the norm from the same bf16 values; ours in bf16 GEMMs, upstream in fp32
    assert rel_rms(y, y_up) < 1e-2
    for k in g:
        assert rel_rms(g[k], g_up[k]) < 2e-2, k


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA kernels of bitsandbytes (run by code/scripts/run_gpu_bench.sh qdora)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq", "int8"])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 4097)], ids=["4096x4096", "ragged-1000x4097"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_row_chunks_and_norm(kind, shape):
    from peft.utils.integrations import dequantize_module_weight

    d_out, d_in = shape
    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(d_in, d_out, bias=False).to(torch.bfloat16), kind, torch.bfloat16, "cuda")
    whole = dequantize_module_weight(q)
    src = quant_mod().quant_rows(q)
    step = 333  # cuts 4-bit blocks mid-way
    for start in range(0, d_out, step):
        assert torch.equal(src[start : start + step], whole[start : start + step].to(src.dtype)), start
    A = torch.randn(64, d_in, device="cuda") / d_in**0.5
    B = torch.randn(d_out, 64, device="cuda") * 0.05
    n = ours().factored_row_norm(quant_mod().quant_rows(q), A, B, 2.0)
    dense = torch.linalg.norm(whole.double() + 2.0 * (B.double() @ A.double()), dim=1)
    assert rel_rms(n, dense) < 1e-3
