"""CPU tests of code/scripts/train_convergence.py (the eager-vs-fused training-convergence study).

The smoke mode (tiny model, a few steps; the fused path runs Triton's CPU interpreter) runs once
in a subprocess; the test then reads the TensorBoard event files it wrote with tensorboard's raw
event-file loader and recomputes every statistic of the summary JSON independently.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("tensorboard", reason="tensorboard not installed (requirements-figures.txt)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "code", "scripts", "train_convergence.py")
STEPS, EVAL_EVERY, SEEDS = 6, 3, (0, 1)  # the smoke preset


def _load_script():
    spec = importlib.util.spec_from_file_location("train_convergence", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _scalars(logdir):
    """{tag: {step: value}} from the raw event records (not the script's or the figure's reader)."""
    import numpy as np
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out = {}
    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
    assert files, f"no event file in {logdir}"
    for f in files:
        for ev in EventFileLoader(f).Load():
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    val = v.simple_value
                elif v.HasField("tensor"):
                    val = float(np.asarray(tensor_util.make_ndarray(v.tensor)).item())
                else:
                    continue
                out.setdefault(v.tag, {})[ev.step] = val
    return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv")
    summary = out / "summary.json"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), TRITON_INTERPRET="1")
    env.pop("PEFT_DORA_FUSED", None)
    p = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out-dir", str(out / "runs"),
                        "--summary", str(summary), "--pretrained-dir", str(out / "base"),
                        "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    with open(summary) as fh:
        return out, json.load(fh), p.stdout


def test_smoke_event_files_and_tags(smoke_run):
    out, summary, stdout = smoke_run
    runs = out / "runs"
    assert _scalars(str(runs / "pretrain"))["pretrain/loss"]
    for impl in ("eager", "fused"):
        for seed in SEEDS:
            sc = _scalars(str(runs / "bf16" / f"{impl}_seed{seed}"))
            assert sorted(sc["train/loss"]) == list(range(1, STEPS + 1))
            assert sorted(sc["eval/loss"]) == list(range(0, STEPS + 1, EVAL_EVERY))
            assert sorted(sc["train/grad_norm"]) == sorted(sc["train/lr"]) == list(range(1, STEPS + 1))
            assert all(math.isfinite(v) and 0 < v < 10 for v in sc["train/loss"].values())
    assert summary["complete"] is True
    assert summary["config"]["preset"] == "smoke"
    assert summary["environment"]["torch"] and "peft" in summary["environment"]
    assert "== bf16: eager vs fused" in stdout and "target met" in stdout
    ic = summary["init_check"]
    assert ic["modules"] == 7 and 0 <= ic["modules_output_differs"] <= ic["modules"]
    assert math.isfinite(ic["loss_abs"]) and math.isfinite(ic["logits_max_abs"])


def test_smoke_summary_matches_event_files(smoke_run):
    out, summary, _ = smoke_run
    g = summary["groups"]["bf16"]
    assert g["seeds"] == list(SEEDS) and g["steps"] == STEPS
    diffs, eval_diffs = [], []
    for seed in SEEDS:
        e = _scalars(str(out / "runs" / "bf16" / f"eager_seed{seed}"))
        f = _scalars(str(out / "runs" / "bf16" / f"fused_seed{seed}"))
        d = [abs(f["train/loss"][k] - e["train/loss"][k]) for k in range(1, STEPS + 1)]
        last = max(set(e["eval/loss"]) & set(f["eval/loss"]))
        ev = abs(f["eval/loss"][last] - e["eval/loss"][last])
        ps = g["per_seed"][str(seed)]
        assert ps["mean_abs"] == pytest.approx(sum(d) / len(d), rel=1e-9, abs=1e-12)
        assert ps["max_abs"] == pytest.approx(max(d), rel=1e-9, abs=1e-12)
        assert ps["step1_abs"] == pytest.approx(d[0], rel=1e-9, abs=1e-12)
        assert ps["final_eval_step"] == last == STEPS
        assert ps["final_eval_abs"] == pytest.approx(ev, rel=1e-9, abs=1e-12)
        diffs += d
        eval_diffs.append(ev)
    assert g["n_pairs"] == len(diffs)
    assert g["mean_abs_dloss"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-9, abs=1e-12)
    assert g["max_abs_dloss"] == pytest.approx(max(diffs), rel=1e-9, abs=1e-12)
    # fewer than 100 steps: everything is "early"
    assert g["first100_mean_abs_dloss"] == pytest.approx(g["mean_abs_dloss"], rel=1e-12)
    assert g["after100_mean_abs_dloss"] is None
    assert g["final_eval_abs_dloss_mean"] == pytest.approx(sum(eval_diffs) / len(eval_diffs),
                                                           rel=1e-9, abs=1e-12)
    assert g["final_eval_abs_dloss_max"] == pytest.approx(max(eval_diffs), rel=1e-9, abs=1e-12)
    tm = summary["targets"]
    assert g["target_met"] == {"mean_abs_dloss": g["mean_abs_dloss"] < tm["mean_abs_dloss"],
                               "final_eval_abs_dloss": g["final_eval_abs_dloss_max"]
                               < tm["final_eval_abs_dloss"]}
    # eager and fused start from one pretrained base and one adapter init: close, not far apart
    assert g["max_abs_dloss"] < 0.05


def test_training_figure_reads_smoke_runs(smoke_run, tmp_path):
    pytest.importorskip("matplotlib")
    out, summary, _ = smoke_run
    p = subprocess.run([sys.executable, os.path.join(ROOT, "paper", "generate_training_figure.py"),
                        "--runs", str(out / "runs"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "training_bf16.pdf").is_file()
    g = summary["groups"]["bf16"]
    mean = float(re.search(r"mean \|dloss\| per step: (\S+)", p.stdout).group(1))
    mx = float(re.search(r"max \|dloss\| per step: (\S+)", p.stdout).group(1))
    assert mean == pytest.approx(g["mean_abs_dloss"], rel=1e-5)
    assert mx == pytest.approx(g["max_abs_dloss"], rel=1e-5)


@pytest.fixture(autouse=True)
def _restore_plugin_state():
    """The script enables dorafactors globally (it is a program); leave the test session as found."""
    import dorafactors

    was = dorafactors.is_enabled()
    yield
    if dorafactors.is_enabled() and not was:
        dorafactors.disable()


def test_corpus_slices_disjoint_and_deterministic():
    tc = _load_script()
    a = tc.load_corpus(max_bytes=4096)
    b = tc.load_corpus(max_bytes=4096)
    lists = {n: set(a[f"_{n}_list"]) for n in ("pretrain", "finetune", "eval")}
    assert all(lists.values())
    assert not lists["pretrain"] & lists["finetune"]
    assert not lists["pretrain"] & lists["eval"]
    assert not lists["finetune"] & lists["eval"]
    assert not any("site-packages" in f for s in lists.values() for f in s)
    for n in ("pretrain", "finetune", "eval"):
        assert a[f"{n}_sha256"] == b[f"{n}_sha256"] and a[n].numel() == 4096
    assert len({a[f"{n}_sha256"] for n in ("pretrain", "finetune", "eval")}) == 3


def test_stats_and_schedule():
    tc = _load_script()
    a = {"train": [1.0, 0.9, 0.8], "eval": {0: 1.2, 2: 1.0}}
    b = {"train": [1.0, 0.95, 0.7], "eval": {0: 1.2, 2: 1.0 + 1e-5}}
    ps = tc.pair_stats(a, b)
    assert ps["mean_abs"] == pytest.approx((0 + 0.05 + 0.1) / 3)
    assert ps["max_abs"] == pytest.approx(0.1) and ps["argmax_step"] == 3
    assert ps["final_eval_abs"] == pytest.approx(1e-5) and ps["eval0_abs"] == 0
    g = tc.group_stats({0: ps}, {0: [0, 0.05, 0.1]}, {"mean": 1e-3, "eval": 1e-4})
    assert g["target_met"] == {"mean_abs_dloss": False, "final_eval_abs_dloss": True}
    # warm-up reaches the peak, cosine ends at 10% of it
    assert tc.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert tc.lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert tc.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert all(tc.lr_at(s + 1, 100, 1.0, 10) <= tc.lr_at(s, 100, 1.0, 10) for s in range(9, 99))


def test_exact_magnitude_init_makes_eager_and_fused_agree_at_init():
    """PEFT on a bf16 model starts m at the bf16-rounded norm (g != 1), so eager and fused round
    differently from the first forward; --magnitude-init exact starts m at the fp32 norm of the
    bf16 weights (g = 1) and both paths return the base output exactly."""
    import torch

    tc = _load_script()
    _, cfg = tc.parse_args(["--smoke"])
    corpus = tc.load_corpus(max_bytes=16384)
    torch.manual_seed(0)
    base = tc.build_model(cfg).state_dict()
    for mode, want_exact in (("peft", False), ("exact", True)):
        cfg["magnitude_init"] = mode
        with tc.dora_impl("eager"):
            model, _ = tc.dora_model(cfg, base, torch.device("cpu"), torch.bfloat16, 0)
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        trained = {p.dtype for p in model.parameters() if p.requires_grad}
        assert frozen == {torch.bfloat16} and trained == {torch.float32}
        rel = max(float(((mod.lora_magnitude_vector["default"].weight
                          - torch.linalg.vector_norm(mod.base_layer.weight.float(), dim=1)).abs()
                         / torch.linalg.vector_norm(mod.base_layer.weight.float(), dim=1)).max())
                  for mod in model.modules() if hasattr(mod, "lora_magnitude_vector")
                  and "default" in mod.lora_magnitude_vector)
        assert (rel == 0.0) is want_exact, (mode, rel)
    ic = tc.init_check(cfg, base, corpus, torch.device("cpu"))  # cfg: exact
    assert ic["modules_output_differs"] == 0 and ic["loss_abs"] == 0.0, ic
