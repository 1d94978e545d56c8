"""Whole models through PEFT: ours vs upstream on identical weights, adapter interchange,
merge/unmerge, several adapters, dropout, train/eval."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from dora_testing import assert_close, use_impl


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).double().eval()


def dora_config(**kw):
    base = dict(r=6, lora_alpha=12, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    base.update(kw)
    return LoraConfig(**base)


def build(impl, base, **kw):
    torch.manual_seed(1)
    with use_impl(impl):
        return get_peft_model(copy.deepcopy(base), dora_config(**kw))


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture
def ids():
    return torch.randint(0, 61, (2, 9))


def logits(model, ids):
    return model(input_ids=ids).logits


def test_model_outputs_match_upstream(base_model, ids):
    up, ours = build("reference", base_model), build("ours", base_model)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"]
    assert hasattr(layer, "row_norm"), f"not our layer: {type(layer)}"
    ref_layer = up.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"]
    assert not hasattr(ref_layer, "row_norm"), f"not the reference layer: {type(ref_layer)}"
    assert_close(logits(ours, ids), logits(up, ids), atol=1e-11, rtol=1e-9, name="logits")


def test_model_gradients_match_upstream(base_model, ids):
    up, ours = build("reference", base_model), build("ours", base_model)
    for model in (up, ours):
        model.train()
        logits(model, ids).square().mean().backward()
    g_up = {n: p.grad for n, p in up.named_parameters() if p.requires_grad}
    g_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert g_up.keys() == g_ours.keys() and any("lora_magnitude_vector" in n for n in g_up)
    for name in g_up:
        assert_close(g_ours[name], g_up[name], atol=1e-12, rtol=1e-8, name=name)


def test_dropout_train_and_eval(base_model, ids):
    up, ours = build("reference", base_model, lora_dropout=0.3), build("ours", base_model, lora_dropout=0.3)
    for mode in ("train", "eval"):
        getattr(up, mode)(), getattr(ours, mode)()
        torch.manual_seed(5)
        a = logits(up, ids)
        torch.manual_seed(5)
        b = logits(ours, ids)
        assert_close(b, a, atol=1e-11, rtol=1e-9, name=f"logits {mode}")


@pytest.mark.parametrize("direction", ["upstream-to-ours", "ours-to-upstream"])
def test_adapters_interchange(base_model, ids, tmp_path, direction):
    src_impl, dst_impl = ("reference", "ours") if direction == "upstream-to-ours" else ("ours", "reference")
    src = build(src_impl, base_model)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.rand_like(p))
    src.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(k.endswith("lora_magnitude_vector") for k in saved), sorted(saved)[:5]
    with use_impl(dst_impl):
        dst = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path)
    sd_src = {k: v for k, v in src.state_dict().items() if "lora_" in k}
    sd_dst = {k: v for k, v in dst.state_dict().items() if "lora_" in k}
    assert sd_src.keys() == sd_dst.keys()
    for k in sd_src:
        assert torch.equal(sd_src[k], sd_dst[k]), k
    assert_close(logits(dst, ids), logits(src, ids), atol=1e-11, rtol=1e-9, name="logits after reload")
    # and the file our model writes is byte-for-byte the same tensors
    dst.save_pretrained(tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_unmerge_and_unload(base_model, ids, safe_merge):
    ours = build("ours", base_model)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.05)
    expected = logits(ours, ids)
    ours.base_model.merge_adapter(safe_merge=safe_merge)
    assert_close(logits(ours, ids), expected, atol=1e-10, rtol=1e-8, name="merged")
    ours.unmerge_adapter()
    assert_close(logits(ours, ids), expected, atol=1e-10, rtol=1e-8, name="unmerged")
    unloaded = ours.merge_and_unload(safe_merge=safe_merge)
    assert_close(logits(unloaded, ids), expected, atol=1e-10, rtol=1e-8, name="merge_and_unload")


def test_merge_matches_upstream_merge(base_model, ids):
    up, ours = build("reference", base_model), build("ours", base_model)
    a = up.merge_and_unload()
    b = ours.merge_and_unload()
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2
        assert_close(p2, p1, atol=1e-12, rtol=1e-10, name=n1)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_two_dora_adapters_merged_equal_unmerged(ids, fan_in_fan_out):
    """Two DoRA adapters active on one layer: merging both gives what running them unmerged gives."""
    if fan_in_fan_out:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=1, n_head=4, n_positions=32)).double()
        kw = dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    else:
        base, kw = tiny_llama(), {}
    with use_impl("ours"):
        torch.manual_seed(2)
        model = get_peft_model(base, dora_config(**kw), adapter_name="a")
        model.add_adapter("b", dora_config(r=3, lora_alpha=5, **kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.rand_like(p))
    model.base_model.set_adapter(["a", "b"])
    model.eval()
    expected = logits(model, ids)
    model.base_model.merge_adapter(["a", "b"])
    assert_close(logits(model, ids), expected, atol=1e-10, rtol=1e-8, name="two merged")
    model.base_model.unmerge_adapter()
    assert_close(logits(model, ids), expected, atol=1e-10, rtol=1e-8, name="two unmerged again")


def test_output_dtype_follows_base_under_fp32_adapters():
    """bf16 base with PEFT's fp32 adapters, no autocast: every adapted layer returns bf16."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Embedding(10, 16)).to(torch.bfloat16)
    with use_impl("ours"):
        model = get_peft_model(lin, LoraConfig(r=4, target_modules=["0", "1"], use_dora=True, init_lora_weights=False))
    assert model.base_model.model[0].lora_A["default"].weight.dtype == torch.float32
    out = model.base_model.model[0](torch.randn(3, 16, dtype=torch.bfloat16))
    emb = model.base_model.model[1](torch.randint(0, 10, (3,)))
    assert out.dtype == torch.bfloat16 and emb.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and torch.isfinite(emb).all()


def test_third_party_call_without_adapter_name_and_weight_attribute(base_model, ids):
    ours = build("ours", base_model)
    mod = ours.base_model.model.model.layers[0].mlp.down_proj
    layer = mod.lora_magnitude_vector["default"]
    assert isinstance(layer.weight, torch.nn.Parameter) and layer.weight.shape == (mod.out_features,)
    x = torch.randn(3, mod.in_features, dtype=torch.float64)
    base_out = mod.base_layer(x)
    delta_a = layer(x, lora_A=mod.lora_A["default"], lora_B=mod.lora_B["default"], scaling=mod.scaling["default"],
                    base_layer=mod.base_layer, base_result=base_out)
    delta_b = layer(x, lora_A=mod.lora_A["default"], lora_B=mod.lora_B["default"], scaling=mod.scaling["default"],
                    base_layer=mod.base_layer, base_result=base_out, adapter_name="default")
    assert torch.equal(delta_a, delta_b)
    assert_close(base_out + delta_a, mod(x), atol=1e-12, rtol=1e-10, name="layer call vs module")
