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

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dora_dist_worker import ENV_NAMES, DEADLINE_S, ours_dist, run_workers, single_process
from dora_testing import TARGET, assert_close, ours, ours_env

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
# inside an FSDP2 unit the inputs are plain tensors, so the fused kernels run (=1 raises where they cannot);
# on the CPU only under Triton's interpreter (conftest sets it without CUDA)
FUSED_SCENARIO = {"ours-layer-fused": ("ours", "layer", {"PEFT_DORA_FUSED": "1"})}
ZERO3_SCENARIOS = {
    "ours-zero3": ("ours", "zero3", {}),
    "ours-zero3-partial": ("ours", "zero3", {"PEFT_FORCE_GATHER": "1", "PEFT_DORA_ALLOW_PARTIAL_GATHER": "1"}),
    "ours-zero3-force0": ("ours", "zero3", {"PEFT_FORCE_GATHER": "0"}),
    "ours-zero3-force1": ("ours", "zero3", {"PEFT_FORCE_GATHER": "1"}),
    "reference-zero3": ("reference", "zero3", {}),
}


def _deepspeed_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("deepspeed") is not None
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    scenarios = dict(FSDP_SCENARIOS)
    if os.environ.get("TRITON_INTERPRET") == "1":
        scenarios.update(FUSED_SCENARIO)
    if _deepspeed_available():
        scenarios.update(ZERO3_SCENARIOS)
    env = {k: os.environ.pop(k) for k in ENV_NAMES if k in os.environ}
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


def test_fsdp2_fused_path_on_plain_tensors(results, single):
    if "ours-layer-fused" not in results:
        pytest.skip("the fused kernels run on the CPU only under Triton's interpreter (TRITON_INTERPRET=1)")
    _check(results["ours-layer-fused"], single["ours"], "ours-layer-fused")


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


def _load_check():
    import importlib.util

    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("multigpu_check", _CHECK)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved  # the script puts src/ first
    return module


@pytest.mark.skipif(not _CHECK.is_file(), reason="code/scripts/multigpu_check.py is not in this tree")
@pytest.mark.skipif(TARGET == "patched", reason="the check builds the plugin's model from src/")
def test_multigpu_check_split_reference():
    """The check's like-for-like reference (``single-split``): the fp32 mean of per-sequence
    gradients is the whole batch's gradient; only the parameters take the compute dtype (RoPE's
    ``inv_freq`` stays fp32, unlike ``.to(bf16)``); AdamW steps fp32 masters, copied back."""
    import argparse

    mg = _load_check()
    args = argparse.Namespace(model="tiny", seq=16, rank=4, lr=1e-2)
    model = mg.build("ours", args, torch.float32)
    ids = mg.batch(args, model.config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    master = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _, split = mg.split_step(model, [ids[:1], ids[1:]], master)
    assert split.keys() == whole.keys()
    for n, g in whole.items():
        assert_close(split[n], g, atol=1e-6, rtol=1e-4, name=n)

    cast = mg.build("ours", args, torch.bfloat16)
    assert cast.base_model.model.model.rotary_emb.inv_freq.dtype == torch.bfloat16  # what single-* trains
    model = mg.build("ours", args, torch.bfloat16, buffers=False)
    assert model.base_model.model.model.rotary_emb.inv_freq.dtype == torch.float32
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    master = {n: p.detach().float().clone() for n, p in params.items()}
    before = {n: m.clone() for n, m in master.items()}
    opt = torch.optim.AdamW(list(master.values()), lr=args.lr)
    loss, grads = mg.split_step(model, [ids[:1], ids[1:]], master, opt)
    assert torch.isfinite(loss) and all(g.dtype == torch.float32 for g in grads.values())
    assert all(p.grad is None for p in params.values())
    for n, m in master.items():
        assert not torch.equal(m, before[n]), n  # stepped in fp32
        assert torch.equal(params[n], m.to(torch.bfloat16)), n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.skipif(not _CHECK.is_file(), reason="code/scripts/multigpu_check.py is not in this tree")
def test_two_gpus_bf16_agree_with_one(tmp_path):
    phases = ["single-ours", "single-upstream", "single-split-ours", "single-split-upstream", "fsdp2-layer-ours",
              "fsdp2-layer-upstream", "fsdp2-linear-ours-partial"]
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
        # against the like-for-like reference (fp32 buffers, mean of per-sequence gradients): bf16 noise only
        assert abs(ph["loss0_minus_single_split"]) < 5e-3, (name, ph["loss0_minus_single_split"])
        assert set(ph["vs_single_split"]) == {"lora_A", "lora_B", "lora_magnitude_vector"}, name
        for kind, agree in ph["vs_single_split"].items():
            assert agree["cosine"] > 0.999, (name, kind, agree)
    assert report["fsdp2-layer-ours"]["fused_compose_calls"] > 0  # plain tensors inside a unit: fused path
    assert report["fsdp2-linear-ours-partial"]["norm_stats"].get("gather_partial", 0) > 0
