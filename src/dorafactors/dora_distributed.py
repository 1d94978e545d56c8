"""The DoRA row norm on parameters sharded by FSDP2 (``fully_shard``) or DeepSpeed ZeRO-3.

The norm ``n_i = ‖W_i + s·(B·A)_i‖`` needs whole rows of ``W``, all of ``A`` and the rows of ``B``.
Inside a sharded layer's forward the engines usually have them materialized already:

* FSDP2 unshards every parameter of an FSDP unit in the unit's pre-forward hook, so with the usual
  wrapping (one unit per decoder layer, or larger) ``W``, ``A``, ``B`` and ``m`` are plain tensors
  when the norm runs and nothing here is involved. A parameter of a unit that is *not* running
  (e.g. each ``nn.Linear`` wrapped on its own: the base layer has resharded by the time the DoRA
  term runs, ``lora_A``/``lora_B`` have not unsharded yet) is a ``DTensor``.
* ZeRO-3 fetches a module's own parameters around that module's forward (and keeps recently used
  ones). Our DoRA layer is normally called by the variant directly (so the fused compose can take
  the running result); under ZeRO-3 the variant calls it through ``nn.Module.__call__``, as
  upstream PEFT does, so DeepSpeed fetches the magnitude ``m`` for forward and backward (the
  compose is then the eager one). ``W``, ``A`` and ``B`` belong to other modules: when DeepSpeed
  has released them at the time the norm runs, the norm gathers them itself.

What the norm does with a parameter an engine manages (``PEFT_FORCE_GATHER``):

* unset (detect): use it as it is when materialized (a ZeRO-3 parameter with status AVAILABLE, a
  fully replicated DTensor); gather it otherwise;
* ``1``: gather every managed parameter for each norm computation, even when it looks materialized;
* ``0``: never gather: a parameter that is not materialized raises ``RuntimeError``.

Gathering is private to the norm and leaves the engine's state alone: ``DTensor.full_tensor()`` for
FSDP2; for ZeRO-3 an all-gather of the parameter's partitions (``ds_tensor``) into a temporary, so a
parameter that DeepSpeed is prefetching (status INFLIGHT) is never handed to
``GatheredParameters`` (whose exit would re-partition a parameter in flight).

``PEFT_DORA_ALLOW_PARTIAL_GATHER=1`` never gathers ``W``: each rank adds up, over the piece of ``W``
it holds (a row block under FSDP2's ``Shard(0)``, a flat element range under ZeRO-3), the row sums
``‖W_i‖²`` and ``Σ_k W_ik (B·A)_ik`` of the base and cross terms, and one all-reduce of a
``[2, d_out]`` vector completes them; ``A`` and ``B`` (small) are gathered whole for the Gram term.
Where the layout does not allow it (ZeRO++ quantized or NVMe-offloaded partitions, Conv layers,
other DTensor placements) a warning says so and ``W`` is gathered whole.

Cache: the norm of sharded inputs is cached like any other (``PEFT_DORA_NORM_CACHE``), keyed on the
engine's stable identity of each parameter (ZeRO-3: the parameter object, its ``ds_id`` and its
partition; FSDP2: the sharded local tensor and its version counter), never on the address of a
gathered copy, so hits and misses agree across ranks (every miss may run collectives). Values
change only through optimizer steps, which invalidate every cache.

This file is also shipped as ``peft.tuners.lora.dora_distributed`` by hf.patch: package-relative
imports only.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any

import torch

from .dora_env import get_config

__all__ = [
    "STATS",
    "is_managed",
    "reset_stats",
    "sharded_row_norm",
]

try:  # FSDP2's sharded parameters
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import Replicate as _Replicate
    from torch.distributed.tensor import Shard as _Shard
except ImportError:  # pragma: no cover - torch built without distributed
    _DTensor = _Replicate = _Shard = None

STATS: collections.Counter = collections.Counter()
"""Counts of how the norm met sharded inputs, per norm computation: ``materialized`` (nothing to
gather), ``gather_full`` (``W`` gathered whole), ``gather_partial`` (``W`` reduced from shards),
``cache_hit``; plus ``gathered_bytes`` (bytes of ``W``, ``A``, ``B`` gathered whole). For reports."""


def reset_stats() -> None:
    STATS.clear()


def _is_zero3(t: Any) -> bool:
    return hasattr(t, "ds_id")


def _is_dtensor(t: Any) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def is_managed(*tensors: Any) -> bool:
    """Whether any tensor is a ZeRO-3 parameter or an FSDP2 ``DTensor`` (cheap; called per forward)."""
    for t in tensors:  # a plain loop: no generator per call
        if hasattr(t, "ds_id") or (_DTensor is not None and isinstance(t, _DTensor)):
            return True
    return False


def _materialized(t: Any) -> bool:
    if _is_zero3(t):
        return getattr(t.ds_status, "name", str(t.ds_status)) == "AVAILABLE"
    if _is_dtensor(t):
        return all(isinstance(p, _Replicate) for p in t.placements)
    return True


def _describe(t: Any) -> str:
    if _is_zero3(t):
        return f"a ZeRO-3 parameter (ds_id {t.ds_id}, shape {tuple(t.ds_shape)}, status {t.ds_status})"
    if _is_dtensor(t):
        return f"an FSDP2 DTensor (shape {tuple(t.shape)}, placements {t.placements})"
    return f"a tensor of shape {tuple(t.shape)}"


# ---------------------------------------------------------------------------------------------
# Cache keys that agree across ranks
# ---------------------------------------------------------------------------------------------


def _stable_key(t: Any) -> tuple:
    if _is_zero3(t):
        part = t.ds_tensor
        return ("ds", id(t), t.ds_id, tuple(t.ds_shape), t.dtype, id(part), part._version)
    if _is_dtensor(t):
        local = t._local_tensor
        return ("dt", id(t), id(local), local.data_ptr(), local._version, tuple(t.shape), t.dtype,
                tuple(t.placements))
    owner = t._base if t._base is not None else t
    # no data_ptr: a plain tensor here is typically an FSDP unit's unsharded parameter, whose
    # storage object is re-allocated in place on every all-gather (at a rank-dependent address)
    return ("t", id(owner), t.untyped_storage()._cdata, t._version, t.dtype, t.device, tuple(t.shape),
            tuple(t.stride()))


# ---------------------------------------------------------------------------------------------
# Gathers (private to the norm: the engines' own state is left alone)
# ---------------------------------------------------------------------------------------------


def _zero3_partition(p) -> tuple[torch.Tensor, int, Any]:
    """``(valid local elements, flat start, group)`` of a ZeRO-3 parameter's own partition."""
    import torch.distributed as dist

    part = p.ds_tensor
    if hasattr(part, "ds_quant_scale") or str(getattr(part, "final_location", "")).endswith("nvme"):
        raise _NoPartial("ZeRO++ quantized or NVMe-offloaded partitions")
    group = p.ds_process_group
    size = part.numel()
    start = dist.get_rank(group=group) * size
    valid = max(0, min(size, p.ds_numel - start))
    return part.reshape(-1)[:valid], start, group


def _collective_device(group, fallback: torch.device) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def _zero3_full(p) -> torch.Tensor:
    import torch.distributed as dist

    part = p.ds_tensor
    if hasattr(part, "ds_quant_scale") or str(getattr(part, "final_location", "")).endswith("nvme"):
        raise NotImplementedError(
            f"dorafactors cannot gather {_describe(p)}: its partition is ZeRO++-quantized or on NVMe; "
            "the norm's own gather supports plain partitions only (unset PEFT_FORCE_GATHER to use parameters "
            "DeepSpeed has materialized)"
        )
    group = p.ds_process_group
    device = _collective_device(group, part.device)
    world = dist.get_world_size(group=group)
    out = torch.empty(world * part.numel(), dtype=part.dtype, device=device)
    dist.all_gather_into_tensor(out, part.reshape(-1).to(device), group=group)
    return out[: p.ds_numel].view(tuple(p.ds_shape))


def _full(t: Any, force: bool) -> torch.Tensor:
    """``t`` as a plain full tensor, gathering when it is not materialized or ``force``."""
    if _is_zero3(t):
        if not force and _materialized(t):
            return t.detach()
        full = _zero3_full(t)
    elif _is_dtensor(t):
        if not force and _materialized(t):
            return t.to_local().detach()
        full = t.full_tensor()
    else:
        return t.detach()
    STATS["gathered_bytes"] += full.numel() * full.element_size()
    return full


class _NoPartial(Exception):
    """The layout of ``W`` does not allow the partial gather (the message says why)."""


def _w_shard(W) -> tuple[torch.Tensor, int, Any]:
    """``(local flat elements, flat start, process group)`` of the piece of stored ``W`` this rank holds."""
    if _is_zero3(W):
        return _zero3_partition(W)
    placements = tuple(W.placements)
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, _Shard)]
    if len(shard_dims) != 1 or placements[shard_dims[0]].dim != 0 or not all(
        isinstance(p, (_Shard, _Replicate)) for p in placements
    ):
        raise _NoPartial(f"DTensor placements {placements} (only Shard(0), optionally with Replicate)")
    mesh_dim = shard_dims[0]
    mesh = W.device_mesh
    local = W.to_local()
    rows = W.shape[0]
    # Shard(0) splits rows as torch.chunk does: ceil(rows / size) per rank, the last ones shorter
    size, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    per = -(-rows // size)
    first = min(rank * per, rows)
    if local.shape[0] != max(0, min(per, rows - first)) or not local.is_contiguous():
        raise _NoPartial(f"an uneven or non-contiguous local shard {tuple(local.shape)} of {tuple(W.shape)}")
    row_width = 1
    for s in W.shape[1:]:
        row_width *= int(s)
    return local.reshape(-1), first * row_width, mesh.get_group(mesh_dim)


# ---------------------------------------------------------------------------------------------
# Norm
# ---------------------------------------------------------------------------------------------


def _partial_row_terms(flat, start, stored_shape, transposed, A, B, need_base, chunk_bytes, acc, gemm):
    """``[2, d_out]``: this rank's share of ``‖W_i‖²`` and ``Σ_k W_ik (B·A)_ik``.

    ``flat`` holds elements ``[start, start + len)`` of the stored weight flattened row-major;
    ``transposed``: the stored weight is ``Wᵀ`` (``fan_in_fan_out``, Embedding).
    """
    d_out = B.shape[0]
    width = 1
    for s in stored_shape[1:]:
        width *= int(s)
    terms = torch.zeros(2, d_out, dtype=acc, device=flat.device)
    A_g = A.to(device=flat.device, dtype=gemm)
    B_acc = B.to(device=flat.device, dtype=acc)
    rows_per_chunk = max(1, chunk_bytes // max(1, 8 * width))
    pos, end = 0, flat.numel()
    while pos < end:
        e = start + pos
        r0, c0 = divmod(e, width)
        if c0 or end - pos < width:
            length = min(width - c0, end - pos)  # a partial stored row
            piece, nrows = flat[pos : pos + length].view(1, length), 1
        else:
            nrows = min((end - pos) // width, rows_per_chunk)
            length = nrows * width
            piece = flat[pos : pos + length].view(nrows, width)
        # the piece in W's orientation: W rows [i0, i0 + h), columns [k0, k0 + w)
        if transposed:
            W_sub, i0, k0 = piece.T, c0, r0
        else:
            W_sub, i0, k0 = piece, r0, c0
        h, w = W_sub.shape
        if need_base:
            terms[0, i0 : i0 + h] += torch.linalg.vector_norm(W_sub, dim=1, dtype=acc).square()
        U = W_sub.to(gemm) @ A_g[:, k0 : k0 + w].T  # [h, r]
        terms[1, i0 : i0 + h] += (U.to(acc) * B_acc[i0 : i0 + h]).sum(dim=1)
        pos += length
    return terms


def _partial_norm(layer, W, A, B, scaling, base_sq, cfg, eps):
    import torch.distributed as dist

    from .dora import _accum_dtype, _gemm_dtype  # lazy: dora imports this module

    if type(layer).__name__.startswith("DoraConv"):
        raise _NoPartial("Conv layers")
    flat, start, group = _w_shard(W)
    device = _collective_device(group, flat.device)
    flat = flat.detach().to(device)
    acc = _accum_dtype(flat, A, B)
    gemm = _gemm_dtype(flat, A)
    with torch.autocast(device_type=device.type, enabled=False) if device.type in ("cuda", "cpu") else _null():
        terms = _partial_row_terms(flat, start, tuple(W.shape) if _is_dtensor(W) else tuple(W.ds_shape),
                                   layer.fan_in_fan_out, A, B, base_sq is None, cfg.norm_chunk_bytes, acc, gemm)
        dist.all_reduce(terms, group=group)
        base = terms[0] if base_sq is None else base_sq.to(device=device, dtype=acc)
        A_g, B_acc = A.to(device=device, dtype=gemm), B.to(device=device, dtype=acc)
        gram = ((B_acc @ (A_g @ A_g.T).to(acc)) * B_acc).sum(dim=1)
        n_sq = base + (2.0 * scaling) * terms[1] + (scaling * scaling) * gram
        norm = n_sq.clamp_min_(0).sqrt_().clamp_min_(eps)
    return norm, base


def _null():
    import contextlib

    return contextlib.nullcontext()


_warned: set = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"PEFT_DORA_ALLOW_PARTIAL_GATHER=1: the partial gather cannot be used for {reason}; "
            "gathering the base weight whole instead",
            RuntimeWarning,
            stacklevel=4,
        )


@torch.no_grad()
def sharded_row_norm(layer, weight, lora_A, lora_B, scaling: float, epoch: int) -> torch.Tensor:
    """The row norm ``n`` [d_out] of ``layer`` when any of ``weight`` (stored, as the base layer holds
    it), ``lora_A`` [r, d_in], ``lora_B`` [d_out, r] is managed by FSDP2 or ZeRO-3.

    Follows ``PEFT_FORCE_GATHER`` and ``PEFT_DORA_ALLOW_PARTIAL_GATHER`` (module docstring) and the
    layer's norm cache. Every rank must call it for the same layers in the same order, as the
    engines' own forward does.

    Raises:
        RuntimeError: ``PEFT_FORCE_GATHER=0`` and a parameter the norm needs is not materialized,
            or the layer's magnitude is partitioned (the layer was not called through ``__call__``).
    """
    from .dora import DORA_NORM_EPS

    cfg = get_config()
    magnitude = getattr(layer, "weight", None)
    if _is_zero3(magnitude) and not _materialized(magnitude):
        raise RuntimeError(
            f"the DoRA magnitude is {_describe(magnitude)}, not materialized in the forward: call the DoRA "
            "layer through nn.Module.__call__ (as dorafactors' variants do under ZeRO-3) so DeepSpeed fetches it"
        )
    if _is_dtensor(magnitude) and not _materialized(magnitude):
        raise RuntimeError(
            f"the DoRA magnitude is {_describe(magnitude)}: the module holding it must belong to an FSDP unit "
            "that is running (do not fully_shard the lora_magnitude_vector modules on their own)"
        )
    tensors = {"base weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if cfg.force_gather is False:
        for name, t in tensors.items():
            if not _materialized(t):
                raise RuntimeError(
                    f"PEFT_FORCE_GATHER=0 forbids gathering, but the DoRA norm needs the {name}, which is "
                    f"{_describe(t)} and not materialized here. Unset PEFT_FORCE_GATHER (detect) or set it to 1."
                )
    cache = layer._norm_cache
    base_key = (_stable_key(weight), layer.fan_in_fan_out)
    norm_key = (base_key, _stable_key(lora_A), _stable_key(lora_B), float(scaling), epoch)
    if cfg.norm_cache and cache.norm_key == norm_key:
        STATS["cache_hit"] += 1
        return cache.norm
    base_sq = cache.base_sq if cfg.norm_cache and cache.base_key == base_key else None
    force = bool(cfg.force_gather)
    A, B = _full(lora_A, force), _full(lora_B, force)
    w_needs_gather = is_managed(weight) and (force or not _materialized(weight))
    norm = None
    if w_needs_gather and cfg.allow_partial_gather:
        try:
            norm, base_sq = _partial_norm(layer, weight, A, B, scaling, base_sq, cfg, DORA_NORM_EPS)
            STATS["gather_partial"] += 1
        except _NoPartial as exc:
            _warn_once(str(exc))
    if norm is None:
        W = _full(weight, force)
        STATS["gather_full" if w_needs_gather else "materialized"] += 1
        W_rows = layer._weight_rows(W)
        if base_sq is None:
            from .dora import base_row_sq

            base_sq = base_row_sq(W_rows, cfg.norm_chunk_bytes)
        norm = layer._compute_norm(W_rows, A, B, scaling, base_sq, cfg.norm_chunk_bytes)
        del W, W_rows  # a gathered copy is freed before the forward goes on
    if cfg.norm_cache:
        cache.base_key, cache.base_sq = base_key, base_sq
        cache.norm_key, cache.norm = norm_key, norm
        cache.generation += 1
    else:
        cache.clear()
    return norm
