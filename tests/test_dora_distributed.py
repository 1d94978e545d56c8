"""Sharded training on the CPU: FSDP2 (``fully_shard``, gloo, 2 processes) against one process.

One pair of spawned workers runs every scenario (one process group, one start-up): a tiny Llama
with DoRA on every linear layer, a data-parallel batch split over the two ranks, loss and
gradients of A, B and m after one backward, and the loss after one SGD step (so the norm cache
must notice the re-gathered, updated adapters). The parent runs the same model in one process and
compares. Scenarios: ours and upstream's DoRA with one FSDP unit per decoder layer plus the root;
ours with every ``nn.Linear`` its own unit (the norm then meets sharded ``DTensor`` parameters)
under each ``PEFT_FORCE_GATHER`` / ``PEFT_DORA_ALLOW_PARTIAL_GATHER`` setting; and, when DeepSpeed
is installed, ZeRO-3 on the CPU. A worker that hangs is killed: the test fails within its deadline.
With 2 GPUs, a GPU test runs code/scripts/multigpu_check.py on a small model in bf16.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from dora_testing import assert_close, ours, ours_env, use_impl

DEADLINE_S = 150
VOCAB, BATCH, SEQ, LR = 61, 4, 8, 0.5

FSDP_SCENARIOS = {
    # name: (impl, wrapping, environment)
    "ours-layer": ("ours", "layer", {}),
    "reference-layer": ("reference", "layer", {}),
    "ours-linear-detect": ("ours", "linear", {}),
    "ours-linear-force1": ("ours", "linear", {"PEFT_FORCE_GATHER": "1"}),
    "ours-linear-partial": ("ours", "linear", {"PEFT_DORA_ALLOW_PARTIAL_GATHER": "1"}),
    "ours-linear-partial-nocache": ("ours", "linear", {"PEFT_DORA_ALLOW_PARTIAL_GATHER": "1",
                                                       "PEFT_DORA_NORM_CACHE": "0"}),
    "ours-linear-force0": ("ours", "linear", {"PEFT_FORCE_GATHER": "0"}),
    "ours-layer-force0": ("ours", "layer", {"PEFT_FORCE_GATHER": "0"}),
}
ZERO3_SCENARIOS = {
    "ours-zero3": ("ours", "zero3", {}),
    "ours-zero3-partial": ("ours", "zero3", {"PEFT_FORCE_GATHER": "1", "PEFT_DORA_ALLOW_PARTIAL_GATHER": "1"}),
    "ours-zero3-force0": ("ours", "zero3", {"PEFT_FORCE_GATHER": "0"}),
    "ours-zero3-force1": ("ours", "zero3", {"PEFT_FORCE_GATHER": "1"}),
    "reference-zero3": ("reference", "zero3", {}),
}
_ENV_NAMES = ("PEFT_FORCE_GATHER", "PEFT_DORA_ALLOW_PARTIAL_GATHER", "PEFT_DORA_NORM_CACHE")


def _deepspeed_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("deepspeed") is not None
    except ValueError:
        return False


def ours_dist():
    """Our ``dora_distributed`` module, beside the ``dora`` module under test."""
    return importlib.import_module(ours().__name__.rsplit(".", 1)[0] + ".dora_distributed")


def build_model(impl: str):
    """The same tiny Llama with the same DoRA adapters (random B, so the norm is not ‖W‖) in every process."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
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
        for var in _ENV_NAMES:
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


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    scenarios = dict(FSDP_SCENARIOS)
    if _deepspeed_available():
        scenarios.update(ZERO3_SCENARIOS)
    env = {k: os.environ.pop(k) for k in _ENV_NAMES if k in os.environ}
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        return run_workers(scenarios, str(tmp_path_factory.mktemp("dist")))
    finally:
        os.environ.update(env)


@pytest.fixture(scope="module")
def single():
    return {impl: single_process(impl) for impl in ("ours", "reference")}


def _check(run: dict, ref: dict, label: str) -> None:
    assert "error" not in run, f"{label}: {run.get('traceback', run.get('error'))}"
    tol = dict(atol=1e-5, rtol=1e-4)  # fp32: the engines reduce in a different order
    assert abs(run["loss0"] - ref["loss0"]) <= 1e-5 * max(1.0, abs(ref["loss0"])), (label, run["loss0"], ref["loss0"])
    assert abs(run["loss1"] - ref["loss1"]) <= 1e-5 * max(1.0, abs(ref["loss1"])), (label, run["loss1"], ref["loss1"])
    assert run["loss1_again"] == run["loss1"], label
    assert run["grads"].keys() == ref["grads"].keys(), label
    assert any("lora_magnitude_vector" in n for n in ref["grads"]) and any("lora_A" in n for n in ref["grads"])
    for name, g in ref["grads"].items():
        assert_close(run["grads"][name], g, name=f"{label}: {name}", **tol)


@pytest.mark.parametrize("name", ["ours-layer", "reference-layer"])
def test_fsdp2_matches_single_process(results, single, name):
    impl = FSDP_SCENARIOS[name][0]
    _check(results[name], single[impl], name)
    # the two implementations agree with each other as well
    _check(results[name], single["reference"], f"{name} vs reference")
    if impl == "ours":
        # one unit per decoder layer: the norm only ever sees materialized (plain) tensors, and FSDP2's
        # re-gather of the same values (new storage address, same storage object) hits the norm cache
        assert not results[name]["stats"].get("gather_full") and not results[name]["stats"].get("gather_partial")
        assert results[name]["norms_recomputed_again"] == 0


@pytest.mark.parametrize("name,gathers", [("ours-linear-detect", "gather_full"), ("ours-linear-force1", "gather_full"),
                                          ("ours-linear-partial", "gather_partial"),
                                          ("ours-linear-partial-nocache", "gather_partial")])
def test_fsdp2_sharded_parameters_in_the_norm(results, single, name, gathers):
    run = results[name]
    _check(run, single["ours"], name)
    stats = run["stats"]
    assert stats.get(gathers, 0) > 0, stats
    other = {"gather_full": "gather_partial", "gather_partial": "gather_full"}[gathers]
    assert not stats.get(other), stats
    if "nocache" not in name:
        assert stats.get("cache_hit", 0) > 0, stats  # the repeated forward re-gathers nothing
        assert run["norms_recomputed_again"] == 0


def test_fsdp2_partial_gather_moves_less(results):
    full = results["ours-linear-detect"]["stats"]["gathered_bytes"]
    partial = results["ours-linear-partial"]["stats"].get("gathered_bytes", 0)
    assert partial < full / 3, (partial, full)  # only A and B whole, never W


def test_force_gather_0(results, single):
    err = results["ours-linear-force0"].get("error", "")
    assert "PEFT_FORCE_GATHER=0" in err and "not materialized" in err and "DTensor" in err, err
    # where FSDP2 has everything materialized, 0 needs no gather and trains normally
    _check(results["ours-layer-force0"], single["ours"], "ours-layer-force0")


@pytest.mark.skipif(not _deepspeed_available(), reason="DeepSpeed is not installed")
@pytest.mark.parametrize("name", list(ZERO3_SCENARIOS))
def test_zero3_matches_single_process(results, single, name):
    impl = ZERO3_SCENARIOS[name][0]
    run = results[name]
    if name == "ours-zero3-force0" and "error" in run:
        # DeepSpeed decides what is materialized when the norm runs; 0 may then refuse, clearly
        assert "PEFT_FORCE_GATHER=0" in run["error"] and "ZeRO-3" in run["error"], run["error"]
        return
    _check(run, single[impl], name)
    stats = run.get("stats", {})
    if name == "ours-zero3-partial":
        assert stats.get("gather_partial", 0) > 0 and not stats.get("gather_full"), stats
    if name == "ours-zero3-force1":
        assert stats.get("gather_full", 0) > 0 and not stats.get("gather_partial"), stats


def test_stable_keys_and_detection():
    dist_mod = ours_dist()
    t = torch.zeros(3, 2)
    assert not dist_mod.is_managed(t, t.T)
    fake = torch.nn.Parameter(torch.zeros(0))
    fake.ds_id, fake.ds_shape, fake.ds_status, fake.ds_tensor = 7, (3, 2), type("S", (), {"name": "NOT_AVAILABLE"})(), t
    assert dist_mod.is_managed(t, fake) and not dist_mod._materialized(fake)
    layer = ours().DoraLinearLayer(fan_in_fan_out=False)
    layer.weight = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match="PEFT_FORCE_GATHER=0 forbids gathering.*ZeRO-3 parameter"):
        with ours_env_override(force_gather=False):
            layer.row_norm(fake, torch.zeros(2, 2), torch.zeros(3, 2), 1.0)


def ours_env_override(**kw):
    return ours_env().config_override(**kw)


def test_partial_row_terms_match_dense():
    """Every split of a weight into flat pieces (ZeRO-3 partitions, FSDP2 row blocks) sums to the dense terms."""
    dist_mod = ours_dist()
    f64 = dict(dtype=torch.float64)
    for transposed in (False, True):
        d_out, d_in, r = 7, 5, 3
        W = torch.randn(d_out, d_in, **f64)
        A, B = torch.randn(r, d_in, **f64), torch.randn(d_out, r, **f64)
        stored = (W.T if transposed else W).contiguous()
        flat = stored.reshape(-1)
        for parts in (1, 2, 3, 4, 6):
            size = -(-flat.numel() // parts)
            total = torch.zeros(2, d_out, **f64)
            for k in range(parts):
                piece = flat[k * size : (k + 1) * size]
                total += dist_mod._partial_row_terms(piece, k * size, tuple(stored.shape), transposed, A, B, True,
                                                     16 * 2**20 if k % 2 else 8 * 3 * 5, torch.float64,
                                                     torch.float64)
            assert_close(total[0], W.square().sum(1), atol=1e-12, rtol=1e-10, name=f"base {transposed} {parts}")
            assert_close(total[1], (W * (B @ A)).sum(1), atol=1e-12, rtol=1e-10, name=f"cross {transposed} {parts}")


# ---------------------------------------------------------------------------------------------
# GPU: the 2-GPU check on a small model (the full-size run is code/scripts/run_multigpu_check.sh)
# ---------------------------------------------------------------------------------------------

_CHECK = Path(__file__).resolve().parents[1] / "code" / "scripts" / "multigpu_check.py"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.skipif(not _CHECK.is_file(), reason="code/scripts/multigpu_check.py is not in this tree")
def test_two_gpus_bf16_agree_with_one(tmp_path):
    phases = ["single-ours", "single-upstream", "fsdp2-layer-ours", "fsdp2-layer-upstream", "fsdp2-linear-ours-partial"]
    if _deepspeed_available():
        phases += ["zero3-ours", "zero3-upstream"]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(_CHECK),
           "--model", "tiny", "--seq", "256", "--rank", "8", "--phases", ",".join(phases), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE_S * 2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "multigpu_check.json").read_text())["phases"]
    for name in phases:
        assert "error" not in report[name], f"{name}: {report[name].get('traceback')}"
    for name in phases:
        if name.startswith("single"):
            continue
        ph = report[name]
        assert abs(ph["loss0_minus_single"]) < 2e-2, (name, ph["loss0_minus_single"])
        for kind, agree in ph["vs_single"].items():
            assert agree["cosine"] > 0.99, (name, kind, agree)
    assert report["fsdp2-layer-ours"]["fused_compose_calls"] > 0  # plain tensors inside a unit: fused path
    assert report["fsdp2-linear-ours-partial"]["norm_stats"].get("gather_partial", 0) > 0
