"""Worker side of tests/test_dora_distributed.py: the model, the single-process reference and the
spawned FSDP2 / ZeRO-3 workers.

A module of its own, imported by plain name, so that ``spawn`` finds the worker function in the
child under any pytest import mode (the patched tree's suite runs with ``--import-mode=importlib``).
"""

from __future__ import annotations

import importlib
import os
import socket
import time
import traceback
from datetime import timedelta

import torch

from dora_testing import ours, use_impl

DEADLINE_S = 150
VOCAB, BATCH, SEQ, LR = 61, 4, 8, 0.5

ENV_NAMES = ("PEFT_FORCE_GATHER", "PEFT_DORA_ALLOW_PARTIAL_GATHER", "PEFT_DORA_NORM_CACHE", "PEFT_DORA_FUSED")


def ours_dist():
    """Our ``dora_distributed`` module, beside the ``dora`` module under test."""
    return importlib.import_module(ours().__name__.rsplit(".", 1)[0] + ".dora_distributed")


def build_model(impl: str):
    """The same tiny Llama with the same DoRA adapters (random B, so the norm is not ‖W‖) in every process."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # intermediate 47: gate/up rows and down_proj's flat size split unevenly over two ranks
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=47, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg).float()
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    with use_impl(impl):
        return get_peft_model(base, config)


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def single_process(impl: str) -> dict:
    model = build_model(impl)
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainable(model).items()}
    torch.optim.SGD(model.parameters(), lr=LR).step()
    with torch.no_grad():
        loss1 = model(input_ids=ids, labels=ids).loss
    return {"loss0": loss.item(), "grads": grads, "loss1": loss1.item()}


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------


def _shard(model, wrapping: str, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    if wrapping == "linear":
        # every nn.Linear (base layers, lora_A, lora_B) its own unit: the DoRA norm meets DTensors
        for module in list(model.modules()):
            if type(module) is torch.nn.Linear:
                fully_shard(module, mesh=mesh)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _run_fsdp(impl, wrapping, rank, world):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    model = build_model(impl)
    _shard(model, wrapping, init_device_mesh("cpu", (world,)))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ids = batch().chunk(world)[rank]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.full_tensor().clone() for n, p in trainable(model).items()}
    opt.step()
    with torch.no_grad():
        loss1 = model(input_ids=ids, labels=ids).loss
        before = _norm_generations(model)
        again = model(input_ids=ids, labels=ids).loss  # same weights: served from the norm cache
        recomputed = _norm_generations(model) - before
    losses = torch.stack([loss.detach(), loss1, again])
    dist.all_reduce(losses)
    return {"loss0": losses[0].item() / world, "grads": grads, "loss1": losses[1].item() / world,
            "loss1_again": losses[2].item() / world, "norms_recomputed_again": recomputed}


def _norm_generations(model) -> int:
    """How often our layers' norm caches were refilled or cleared (0 for upstream's layers)."""
    return sum(getattr(getattr(m, "_norm_cache", None), "generation", 0) for m in model.modules())


def _run_zero3(impl, rank, world):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    model = build_model(impl)
    names = list(trainable(model))
    config = {"train_micro_batch_size_per_gpu": BATCH // world, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**6}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    ids = batch().chunk(world)[rank]
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    params = dict(engine.module.named_parameters())
    grads = {n: safe_get_full_grad(params[n]).clone() for n in names}
    engine.step()
    with torch.no_grad():
        loss1 = engine(input_ids=ids, labels=ids).loss
        again = engine(input_ids=ids, labels=ids).loss  # same weights: served from the norm cache
    losses = torch.stack([loss.detach(), loss1, again])
    dist.all_reduce(losses)
    return {"loss0": losses[0].item() / world, "grads": grads, "loss1": losses[1].item() / world,
            "loss1_again": losses[2].item() / world}


def _worker(rank, world, port, out_dir, scenarios):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    stats = ours_dist()
    results = {}
    for name, (impl, wrapping, env) in scenarios.items():
        for var in ENV_NAMES:
            os.environ.pop(var, None)
        os.environ.update(env)
        stats.reset_stats()
        try:
            out = _run_zero3(impl, rank, world) if wrapping == "zero3" else _run_fsdp(impl, wrapping, rank, world)
            out["stats"] = dict(stats.STATS)
        except Exception as exc:  # recorded; the parent decides whether it was expected
            out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            dist.barrier()
        results[name] = out
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(scenarios: dict, out_dir: str, world: int = 2) -> dict:
    """Spawn ``world`` workers running ``scenarios``; kill them and fail after ``DEADLINE_S``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world, port, out_dir, scenarios), daemon=True)
             for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [p.pid for p in procs if p.is_alive()]
        assert not hung, f"distributed workers {hung} still running after {DEADLINE_S} s: killed"
        codes = [p.exitcode for p in procs]
        assert codes == [0] * world, f"worker exit codes {codes}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return torch.load(os.path.join(out_dir, "results.pt"))
