"""PEFT LoRA variants that route DoRA through our layers.

PEFT's LoRA layers look their variant classes up in ``peft.tuners.lora.variants`` at call time
(``resolve_lora_variant``), so replacing those attributes is the seam (see :mod:`dorafactors.plugin`).
Besides creating our layers, these variants fix two things upstream got wrong before 0.21:

* merging several DoRA adapters on one layer: each adapter's norm must be taken on the *unmerged*
  base weight, exactly as its forward sees it; we recover that weight from the merged one by undoing
  the already-merged adapters on a copy (no merge/unmerge replay of the module itself);
* ``unmerge`` with ``fan_in_fan_out`` transposes the DoRA factor as ``merge`` did.

The forward keeps PEFT's semantics (adapters compose one after another on the running result) and
keeps the running result's dtype, so PEFT's fp32 adapters do not leak fp32 into the next op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft.utils.integrations import dequantize_module_weight
from peft.utils.other import transpose

from .dora import DoraConv1dLayer, DoraConv2dLayer, DoraConv3dLayer, DoraEmbeddingLayer, DoraLinearLayer
from .dora_distributed import is_managed

__all__ = [
    "DoraConv1dVariant",
    "DoraConv2dVariant",
    "DoraConv3dVariant",
    "DoraEmbeddingVariant",
    "DoraLinearVariant",
]


def _register_magnitude(module) -> None:
    if "lora_magnitude_vector" not in module.adapter_layer_names:
        # the first DoRA adapter: make the magnitudes trainable adapter parameters
        module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)


def _adapter_kwarg(layer, adapter_name: str) -> dict:
    """Our layers take ``adapter_name``; a foreign DoRA layer (PEFT 0.18's) may not."""
    return {"adapter_name": adapter_name} if hasattr(layer, "row_norm") else {}


def _norm_key(adapter: str) -> str:
    return f"{adapter}-weight_norm"


class DoraLinearVariant:
    """DoRA for ``peft.tuners.lora.Linear`` (also transformers' ``Conv1D`` through fan_in_fan_out)."""

    layer_cls = DoraLinearLayer

    # -- shape of the DoRA factor m / n against the stored weight --------------------------------

    @staticmethod
    def _factor_view(module, factor: torch.Tensor) -> torch.Tensor:
        return transpose(factor.reshape(-1, 1), module.fan_in_fan_out)

    @staticmethod
    def _delta_rows(module, delta: torch.Tensor) -> torch.Tensor:
        return transpose(delta, module.fan_in_fan_out)

    # -- init -------------------------------------------------------------------------------------

    @classmethod
    def _make_layer(cls, module):
        return cls.layer_cls(fan_in_fan_out=getattr(module, "fan_in_fan_out", False))

    @classmethod
    def _adapter_weights(cls, module, adapter_name: str):
        return module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight

    @classmethod
    def init(cls, module, adapter_name: str, **kwargs: Any) -> None:
        _register_magnitude(module)
        layer = cls._make_layer(module)
        lora_A, lora_B = cls._adapter_weights(module, adapter_name)
        place_on_cpu = False
        if getattr(module, "ephemeral_gpu_offload", False):
            # compute the initial norm on the accelerator, keep the magnitude where the adapter lives
            place_on_cpu = lora_A.device.type == "cpu" or lora_B.device.type == "cpu"
            accel = next((t.device for t in (lora_A, lora_B) if t.device.type != "cpu"), None)
            if accel is None and torch.cuda.is_available():
                accel = torch.device("cuda")
            if accel is not None:
                lora_A, lora_B = lora_A.to(accel), lora_B.to(accel)
        layer.update_layer(
            base_layer=module.get_base_layer(),
            lora_A=lora_A,
            lora_B=lora_B,
            scaling=module.scaling[adapter_name],
            place_on_cpu=place_on_cpu,
        )
        module.lora_magnitude_vector[adapter_name] = layer

    # -- merge / unmerge ------------------------------------------------------------------------

    @classmethod
    def _unmerged_base(cls, module, current: torch.Tensor) -> torch.Tensor:
        """The base weight with the already merged adapters taken out (a copy, ``current`` untouched)."""
        merged = list(getattr(module, "merged_adapters", []))
        if not merged:
            return current
        acc = torch.float64 if current.dtype == torch.float64 else torch.float32
        weight = current.detach().to(acc, copy=True)
        for name in reversed(merged):
            delta = module.get_delta_weight(name).to(acc)
            if name in module.lora_magnitude_vector and _norm_key(name) in module._caches:
                factor = module.lora_magnitude_vector[name].weight.detach().to(acc) / module._caches[
                    _norm_key(name)
                ].to(acc)
                weight = weight / cls._factor_view(module, factor) - delta
            else:
                weight = weight - delta
        return weight

    @classmethod
    def _merged_weight(cls, module, adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        layer = module.lora_magnitude_vector[adapter]
        delta = module.get_delta_weight(adapter)
        base = cls._unmerged_base(module, dequantize_module_weight(module.get_base_layer()))
        # the delta already includes the scaling
        norm = layer.get_weight_norm(base, cls._delta_rows(module, delta), scaling=1).detach()
        module._cache_store(_norm_key(adapter), norm)
        factor = layer.weight.detach() / norm
        return (cls._factor_view(module, factor) * (orig_weight + delta)).to(orig_weight.dtype)

    @classmethod
    def merge_safe(cls, module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return cls._merged_weight(module, active_adapter, orig_weight)

    @classmethod
    def merge_unsafe(cls, module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = cls._merged_weight(module, active_adapter, orig_weight.data)

    @classmethod
    def unmerge(cls, module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = module.get_delta_weight(active_adapter)
        norm = module._cache_pop(_norm_key(active_adapter))
        factor = module.lora_magnitude_vector[active_adapter].weight.detach() / norm
        return (orig_weight.data / cls._factor_view(module, factor) - delta).to(orig_weight.dtype)

    # -- forward --------------------------------------------------------------------------------

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        dropout_active = not (isinstance(dropout, nn.Identity) or not module.training)
        if dropout_active:
            x = dropout(x)
        layer = module.lora_magnitude_vector[active_adapter]
        kwargs = dict(lora_A=lora_A, lora_B=lora_B, scaling=module.scaling[active_adapter],
                      base_layer=module.get_base_layer(), **_adapter_kwarg(layer, active_adapter))
        if hasattr(layer, "forward_output") and not is_managed(layer.weight):  # ours: may take the fused path
            return layer.forward_output(x, result, dropout_active=dropout_active, **kwargs)
        # a ZeRO-3 magnitude is fetched only around its module's own forward: call it through __call__
        delta = layer(x, base_result=None if dropout_active else result, **kwargs)
        return result + delta.to(result.dtype)


class DoraEmbeddingVariant(DoraLinearVariant):
    layer_cls = DoraEmbeddingLayer

    @staticmethod
    def _factor_view(module, factor):
        return factor.reshape(1, -1)

    @staticmethod
    def _delta_rows(module, delta):
        return delta.T

    @classmethod
    def _make_layer(cls, module):
        return cls.layer_cls(fan_in_fan_out=True)

    @classmethod
    def _adapter_weights(cls, module, adapter_name):
        return module.lora_embedding_A[adapter_name], module.lora_embedding_B[adapter_name]

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        g, result_dora = module.lora_magnitude_vector[active_adapter](
            x,
            lora_A=module.lora_embedding_A[active_adapter].T,
            lora_B=module.lora_embedding_B[active_adapter].T,
            scaling=module.scaling[active_adapter],
            base_layer=module.get_base_layer(),
            embed_fn=module._embed,
            **_adapter_kwarg(module.lora_magnitude_vector[active_adapter], active_adapter),
        )
        # scaled embeddings (e.g. Gemma) scale the base output in forward: scale DoRA's part alike,
        # after the norm, so DoRA's weight geometry is unchanged
        embed_scale = module._get_embed_scale() if hasattr(module, "_get_embed_scale") else None
        if embed_scale is not None:
            result_dora = result_dora * embed_scale.to(result_dora.dtype)
        return (g * result + result_dora).to(result.dtype)


class _DoraConvNdVariant(DoraLinearVariant):
    @staticmethod
    def _factor_view(module, factor):
        return factor.reshape(*module._get_dora_factor_view())

    @staticmethod
    def _delta_rows(module, delta):
        return delta

    @classmethod
    def _make_layer(cls, module):
        return cls.layer_cls(fan_in_fan_out=False)


class DoraConv1dVariant(_DoraConvNdVariant):
    layer_cls = DoraConv1dLayer


class DoraConv2dVariant(_DoraConvNdVariant):
    layer_cls = DoraConv2dLayer


class DoraConv3dVariant(_DoraConvNdVariant):
    layer_cls = DoraConv3dLayer
