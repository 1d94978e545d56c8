"""The six language models of DESIGN.md's table, built from transformers config classes with random
weights (no downloads), and the module / trainable-parameter counts that check them.

Dimensions are the published language-model ones. Qwen2.5-VL-32B's LM is a Qwen2 decoder, the
Qwen3-VL LMs are Qwen3 decoders (text path only; multimodal RoPE does not change a linear
layer), Gemma-3-27B uses ``Gemma3TextConfig``, Mistral-Small-3.2-24B ``MistralConfig`` and
Qwen3.5-27B transformers' own ``Qwen3_5TextConfig`` (hybrid: three Gated-DeltaNet linear-attention
layers, then one gated full-attention layer); where the installed transformers lacks a config
class the model is skipped with that reason. Every linear layer of the decoder is adapted
(``lm_head`` is not). The smoke profile keeps each architecture but shrinks every dimension.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

__all__ = ["MODELS", "MODEL_NAMES", "ModelSpec", "analytic_counts", "build_config", "build_model", "dense_twin",
           "dora_counts", "enable_checkpointing", "meta_counts", "quantize_targets"]

STANDARD_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR_ATTENTION_TARGETS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    config_class: str
    dims: dict[str, Any]
    smoke_dims: dict[str, Any]
    targets: tuple[str, ...]
    expected_modules: int  # DoRA modules at full depth, r=384
    expected_trainable: int  # trainable parameters at full depth, r=384
    hybrid: bool = False

    @property
    def full_layers(self) -> int:
        return int(self.dims["num_hidden_layers"])

    def config_cls(self):
        import transformers

        cls = getattr(transformers, self.config_class, None)
        if cls is None:
            return None, (f"transformers {transformers.__version__} ships no {self.config_class}; "
                          f"{self.title} skipped")
        return cls, None


_SMOKE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("qwen2.5-vl-32b", "Qwen2.5-VL-32B (LM)", "Qwen2Config",
                  dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                       num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
                  {k: v for k, v in _SMOKE.items() if k != "head_dim"},
                  STANDARD_TARGETS, 448, 3_225_878_528),
        ModelSpec("qwen3-vl-32b", "Qwen3-VL-32B (LM)", "Qwen3Config",
                  dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
                  dict(_SMOKE), STANDARD_TARGETS, 448, 3_225_812_992),
        ModelSpec("qwen3-vl-8b", "Qwen3-VL-8B (LM)", "Qwen3Config",
                  dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
                  dict(_SMOKE), STANDARD_TARGETS, 252, 1_048_928_256),
        ModelSpec("gemma-3-27b", "Gemma-3-27B (LM)", "Gemma3TextConfig",
                  dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
                       num_key_value_heads=16, head_dim=128, vocab_size=262208),
                  dict(_SMOKE, sliding_window=32), STANDARD_TARGETS, 434, 2_728_238_080),
        ModelSpec("mistral-small-3.2-24b", "Mistral-Small-3.2-24B (LM)", "MistralConfig",
                  dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=131072, tie_word_embeddings=False),
                  dict(_SMOKE), STANDARD_TARGETS, 280, 2_221_015_040),
        ModelSpec("qwen3.5-27b", "Qwen3.5-27B (LM, hybrid attention)", "Qwen3_5TextConfig",
                  dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
                       num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48,
                       linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                       vocab_size=248320, tie_word_embeddings=False),
                  dict(_SMOKE, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=16, num_hidden_layers=4),
                  STANDARD_TARGETS + LINEAR_ATTENTION_TARGETS, 496, 2_805_371_392, hybrid=True),
    )
}
MODEL_NAMES = tuple(MODELS)


def build_config(spec: ModelSpec, *, layers: Optional[int] = None, smoke: bool = False):
    """``(config, depth, skip_reason)``: the config at ``layers`` decoder layers (full depth when
    ``None``; clamped to full depth), or ``(None, 0, reason)`` when transformers lacks the class."""
    cls, reason = spec.config_cls()
    if cls is None:
        return None, 0, reason
    dims = dict(spec.smoke_dims if smoke else spec.dims)
    full = int(dims["num_hidden_layers"])
    depth = full if layers is None else min(int(layers), full)
    if spec.hybrid:
        # the published pattern (three linear-attention layers, then one full) cut to the depth kept
        pattern = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(full)]
        dims["layer_types"] = pattern[:depth]
    dims["num_hidden_layers"] = depth
    dims.setdefault("use_cache", False)
    return cls(**dims), depth, None


def build_model(config, *, device: torch.device, dtype: torch.dtype, seed: int):
    """A causal LM with random weights (transformers' own init), built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def enable_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing on a transformers model, under either name."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _is_target(name: str, targets: tuple[str, ...]) -> bool:
    return name.rsplit(".", 1)[-1] in targets


def analytic_counts(model: torch.nn.Module, targets: tuple[str, ...], r: int) -> tuple[int, int]:
    """DoRA modules and trainable parameters ``Σ r·(d_in + d_out) + d_out`` over the target linears
    (works on a meta-device model: nothing is allocated)."""
    modules = trainable = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _is_target(name, targets):
            modules += 1
            trainable += r * (module.in_features + module.out_features) + module.out_features
    return modules, trainable


def dora_counts(peft_model: torch.nn.Module) -> tuple[int, int]:
    """DoRA modules (layers holding a magnitude vector) and trainable parameters of a PEFT model."""
    modules = sum(1 for m in peft_model.modules()
                  if isinstance(getattr(m, "lora_magnitude_vector", None), torch.nn.ModuleDict)
                  and len(m.lora_magnitude_vector))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return modules, trainable


def meta_counts(spec: ModelSpec, r: int = 384) -> tuple[int, int]:
    """Counts of the full-depth model built on the meta device (no memory), for checks and tests."""
    config, _depth, reason = build_config(spec)
    if config is None:
        raise RuntimeError(reason)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return analytic_counts(model, spec.targets, r)


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def quantize_targets(model: torch.nn.Module, targets: tuple[str, ...], quant: str, device: torch.device) -> int:
    """Replace every target linear by its bitsandbytes twin (``quant``: nf4, nf4-dq, fp4, int8), as
    ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` would: 4-bit layers
    compute in the model dtype, 8-bit ones are LLM.int8() without outlier threshold. Sets the flag
    PEFT reads to pick its quantized LoRA layers. Returns the number of layers quantized."""
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        if not (type(module) is torch.nn.Linear and _is_target(name, targets)):
            continue
        bias = module.bias is not None
        if quant == "int8":
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=bias, has_fp16_weights=False,
                                      threshold=0.0, device="cpu")
        else:
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=bias,
                                    compute_dtype=module.weight.dtype, compress_statistics=quant.endswith("-dq"),
                                    quant_type=quant[:3], device="cpu")
            # quantized from weights in the model dtype (quant_state.dtype), as transformers loads them
            new = new.to(module.weight.dtype)
        # bitsandbytes quantizes when the layer moves to its device; the dense weight goes with the old layer
        new.load_state_dict({k: v.to("cpu") for k, v in module.state_dict().items()})
        _replace(model, name, new.to(device))
        del module
        count += 1
    setattr(model, "is_loaded_in_8bit" if quant == "int8" else "is_loaded_in_4bit", True)
    return count


@torch.no_grad()
def dense_twin(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype`` whose quantized linears are plain ``nn.Linear`` holding the
    dequantized values (the fidelity truth of a quantized model)."""
    import copy

    from peft.utils.integrations import dequantize_module_weight

    twin = copy.deepcopy(model)
    # dequantize from the original: a deep copy of bitsandbytes' Int8Params loses its row scales
    for name, module in list(model.named_modules()):
        if type(getattr(module, "weight", None)).__name__ not in ("Params4bit", "Int8Params"):
            continue
        weight = dequantize_module_weight(module)
        new = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=weight.device, dtype=dtype)
        new.weight.copy_(weight)
        if module.bias is not None:
            new.bias.copy_(module.bias)
        _replace(twin, name, new)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(twin, flag):
            delattr(twin, flag)
    return twin.to(dtype)
