"""CPU tests of paper/generate_figures.py and paper/generate_training_figure.py.

Both scripts run on the small committed sample data in paper/sample_data/ (regenerate it with
paper/sample_data/make_sample_data.py); generate_figures.py also runs on the committed
code/results/. Skipped when matplotlib or tensorboard is not installed
(pip install -r requirements-figures.txt).
"""

import glob
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib", reason="matplotlib not installed (requirements-figures.txt)")
pytest.importorskip("tensorboard", reason="tensorboard not installed (requirements-figures.txt)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "paper")
SAMPLE = os.path.join(PAPER, "sample_data")


def _run(script, *args):
    p = subprocess.run([sys.executable, os.path.join(PAPER, script), *args],
                       check=False, capture_output=True, text=True, timeout=120, cwd="/")
    return p.returncode, p.stdout + p.stderr


def _nonempty(out_dir, names, exts=(".pdf", ".png")):
    for n in names:
        for ext in exts:
            path = os.path.join(out_dir, n + ext)
            assert os.path.isfile(path), path
            assert os.path.getsize(path) > 1000, path


def test_generate_figures_on_sample(tmp_path):
    rc, out = _run("generate_figures.py", "--results", os.path.join(SAMPLE, "results"),
                   "--out", str(tmp_path), "--png")
    assert rc == 0, out
    _nonempty(tmp_path, ["compose_bandwidth", "fused_kernels_bandwidth", "layer_speedup",
                         "model_speedup", "model_memory", "stability"])
    # the sample has no norm suite: reported, not fatal, and no file written
    assert re.search(r"\[missing\] norm_time_memory: .*norm", out), out
    assert not os.path.exists(tmp_path / "norm_time_memory.pdf")


def test_generate_figures_on_committed_results(tmp_path):
    results = os.path.join(ROOT, "code", "results")
    if not glob.glob(os.path.join(results, "*.json")):
        pytest.skip("no committed results")
    rc, out = _run("generate_figures.py", "--results", results, "--out", str(tmp_path))
    assert rc == 0, out
    _nonempty(tmp_path, ["layer_speedup", "model_speedup", "model_memory", "stability"],
              exts=(".pdf",))
    # every figure is either drawn or reported missing
    for name in ("norm_time_memory", "compose_bandwidth", "fused_kernels_bandwidth",
                 "layer_speedup", "model_speedup", "model_memory", "stability"):
        assert f"[ok] {name}:" in out or f"[missing] {name}:" in out, (name, out)
    assert "H100" in out or "using" in out


def test_generate_figures_empty_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out = _run("generate_figures.py", "--results", str(empty), "--out", str(tmp_path / "o"))
    assert rc == 1
    assert out.count("[missing]") == 7, out


def _independent_stats(run_dir):
    """Read the sample events with tensorboard's raw event-file loader (not EventAccumulator)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    def scalars(d):
        out = {}
        for f in sorted(glob.glob(os.path.join(d, "events.out.tfevents.*"))):
            for ev in EventFileLoader(f).Load():
                for v in ev.summary.value:
                    if v.HasField("simple_value"):
                        out.setdefault(v.tag, {})[ev.step] = v.simple_value
                    elif v.HasField("tensor"):  # newer writers store scalars as tensors
                        import numpy as np
                        from tensorboard.util import tensor_util
                        out.setdefault(v.tag, {})[ev.step] = float(
                            np.asarray(tensor_util.make_ndarray(v.tensor)).item())
        return out

    diffs, eval_diffs = [], []
    seeds = sorted(int(m.group(1)) for m in (re.match(r"eager_seed(\d+)$", n)
                                            for n in os.listdir(run_dir)) if m)
    assert seeds
    for s in seeds:
        e = scalars(os.path.join(run_dir, f"eager_seed{s}"))
        f = scalars(os.path.join(run_dir, f"fused_seed{s}"))
        steps = sorted(set(e["train/loss"]) & set(f["train/loss"]))
        diffs += [abs(f["train/loss"][k] - e["train/loss"][k]) for k in steps]
        last = max(set(e["eval/loss"]) & set(f["eval/loss"]))
        eval_diffs.append(abs(f["eval/loss"][last] - e["eval/loss"][last]))
    return sum(diffs) / len(diffs), max(diffs), sum(eval_diffs) / len(eval_diffs), max(eval_diffs)


def test_training_figure_stats(tmp_path):
    rc, out = _run("generate_training_figure.py", "--runs", os.path.join(SAMPLE, "runs"),
                   "--out", str(tmp_path), "--png")
    assert rc == 0, out
    _nonempty(tmp_path, ["training_demo"])
    mean = float(re.search(r"mean \|dloss\| per step: (\S+)", out).group(1))
    mx = float(re.search(r"max \|dloss\| per step: (\S+)", out).group(1))
    m = re.search(r"final eval \|dloss\|: mean (\S+), max (\S+)", out)
    ev_mean, ev_max = float(m.group(1)), float(m.group(2))
    want = _independent_stats(os.path.join(SAMPLE, "runs", "demo"))
    got = (mean, mx, ev_mean, ev_max)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5), (got, want)
    assert 0 < mean < mx  # the sample is not trivially identical


def test_training_figure_no_runs(tmp_path):
    rc, out = _run("generate_training_figure.py", "--runs", str(tmp_path / "nothing"),
                   "--out", str(tmp_path))
    assert rc != 0
    assert "no convergence runs found" in out


def test_layer_figure_draws_one_gpu_and_dtype():
    """Lines that join points of different GPUs or dtypes mean nothing: the layer figure keeps one
    source, bf16 first, then the one with the most rows."""
    sys.path.insert(0, PAPER)
    try:
        import generate_figures as gf
    finally:
        sys.path.remove(PAPER)

    def rows(gpu, dtype, count):
        return [{"_gpu": gpu, "dtype": dtype, "i": i} for i in range(count)]

    mixed = rows("H200", "fp32", 9) + rows("H100", "bf16", 3) + rows("H200", "bf16", 5)
    kept = gf._one_source(mixed)
    assert {(r["_gpu"], r["dtype"]) for r in kept} == {("H200", "bf16")} and len(kept) == 5
    no_bf16 = rows("H100", "fp16", 2) + rows("H100", "fp32", 4)
    assert {r["dtype"] for r in gf._one_source(no_bf16)} == {"fp32"}


def test_compose_figure_takes_its_lines_and_roofline_from_one_source():
    """The compose figure's whole-call lines, kernel-only lines and copy roofline come from one GPU and
    dtype (it had taken the first row it met of each, whatever its run)."""
    sys.path.insert(0, PAPER)
    try:
        import generate_figures as gf
    finally:
        sys.path.remove(PAPER)

    def row(gpu, dtype, case, metric, value):
        return {"_gpu": gpu, "dtype": dtype, "suite": "compose", "case": case, "metric": metric, "value": value}

    all_rows = [row(g, d, c, m, v) for g, d, v in (("H200", "bf16", 1.0), ("H100", "bf16", 2.0), ("H100", "fp32", 3.0))
                for c, m in (("fwd", "bandwidth"), ("bwd", "bandwidth"), ("fwd", "kernel_bandwidth"),
                             ("copy_bandwidth", "bandwidth"))]
    all_rows += [row("H100", "bf16", "bwd", "bandwidth", 2.5)]  # H100 bf16 has the most rows

    class Res:
        def select(self, suite, metric):
            return [r for r in all_rows if r["suite"] == suite and r["metric"] == metric]

    calls, kernel, copy = gf._compose_rows(Res())
    for part in (calls, kernel, copy):
        assert part and {(r["_gpu"], r["dtype"]) for r in part} == {("H100", "bf16")}
    assert {r["case"] for r in calls} == {"fwd", "bwd"} and [r["case"] for r in copy] == ["copy_bandwidth"]
