"""Tests of the benchmark harness (code/bench_dora_comprehensive.py and code/bench/), on the CPU.

The end-to-end test runs ``--suite all --smoke`` in a subprocess the way CI does (CI=true, stdin
not a terminal, another working directory) and checks the JSON against the schema; the rest are
unit tests of the timing and statistics helpers, the SHA-1 start-up check, flag validation, the
schema validator and the model registry's counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CODE = REPO / "code"
SCRIPT = CODE / "bench_dora_comprehensive.py"
if str(CODE) not in sys.path:
    sys.path.insert(0, str(CODE))

from bench import startup  # noqa: E402
from bench.common import Case, compare  # noqa: E402
from bench.config import parse_args  # noqa: E402
from bench.results import Recorder, output_path, validate  # noqa: E402
from bench.timing import measure, percentile, rotation_count, summarize  # noqa: E402


def _reference_ok() -> tuple[bool, str]:
    problems, info = startup.check_environment()
    ref = [p for p in problems if "reference" in p.what]
    return (not ref, ref[0].render() if ref else "")


def _run(args: list[str], tmp_path: Path, timeout: int = 170) -> subprocess.CompletedProcess:
    env = dict(os.environ, CI="true", PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def test_suite_all_smoke_on_cpu_writes_valid_json(tmp_path):
    ok, why = _reference_ok()
    if not ok:
        pytest.skip(f"upstream reference not available:\n{why}")
    out = tmp_path / "results"
    proc = _run(["--suite", "all", "--smoke", "--device", "cpu", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    assert re.fullmatch(r"cpu_all_bf16_\d{8}-\d{6}\.json", files[0].name), files[0].name
    doc = json.loads(files[0].read_text())
    assert validate(doc) == []
    run = doc["run"]
    assert run["timer"] == "time.perf_counter" and run["profile"] == "smoke" and run["cpu_fallback"] is True
    assert any("CPU" in note for note in run["notes"])
    assert "CPU" in proc.stderr or "CPU" in proc.stdout
    rows = doc["rows"]
    assert {r["suite"] for r in rows} == {"norm", "compose", "layer", "memory", "stability", "model"}
    assert not [r for r in rows if r["status"] == "error"]
    timed = {(r["suite"], r["provider"]) for r in rows if r["metric"] == "time" and r["status"] == "ok"}
    for suite in ("layer", "model"):
        for provider in ("base", "lora", "peft_ref", "ours_eager", "ours_auto"):
            assert (suite, provider) in timed, (suite, provider)
    # every DoRA provider passed its correctness checks against the reference
    failed = [r for r in rows if r["metric"] == "correctness" and r["status"] != "ok"]
    assert not failed, failed
    # memory is not measured on the CPU, and says why
    mem = [r for r in rows if r["metric"] == "peak_extra_mem"]
    assert mem and all(r["status"] == "skipped" and "CPU" in r["note"] for r in mem)
    # ratios against the reference and LoRA are filled in
    assert any(r.get("ratio_vs_ref") and r.get("ratio_vs_lora") for r in rows if r["unit"] == "ms")
    # the module / parameter counts of the model built are checked
    counts = [r for r in rows if r["case"] == "counts" and r["metric"] in ("dora_modules", "trainable_params")]
    assert counts and all(r["status"] == "ok" for r in counts)
    assert doc["environment"]["torch"] == torch.__version__
    assert "--smoke" in doc["environment"]["command_line"]


def test_quantized_model_suite_smoke_on_cpu(tmp_path):
    """``--quant nf4-dq``: QLoRA, upstream QDoRA and ours on a 4-bit base, recorded in the JSON."""
    pytest.importorskip("bitsandbytes")
    ok, why = _reference_ok()
    if not ok:
        pytest.skip(f"upstream reference not available:\n{why}")
    out = tmp_path / "results"
    proc = _run(["--suite", "model", "--smoke", "--device", "cpu", "--models", "qwen3-vl-8b", "--quant", "nf4-dq",
                 "--providers", "lora,peft_ref,ours_auto", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    doc = json.loads(next(out.glob("*.json")).read_text())
    assert validate(doc) == []
    assert doc["run"]["settings"]["quant"] == "nf4-dq"
    rows = doc["rows"]
    assert rows and all(r["shape"].get("quant") == "nf4-dq" for r in rows)
    assert not [r for r in rows if r["status"] in ("error", "failed")]
    timed = {(r["case"], r["provider"]) for r in rows if r["metric"] == "time" and r["status"] == "ok"}
    assert {(c, p) for c in ("inference", "gradient") for p in ("lora", "peft_ref", "ours_auto")} <= timed
    correct = [r for r in rows if r["metric"] == "correctness"]
    assert correct and all(r["status"] == "ok" for r in correct)


def test_startup_failure_is_non_interactive_exit(tmp_path):
    proc = _run(["--suite", "norm", "--smoke", "--device", "cpu", "--out", str(tmp_path),
                 "--reference", str(tmp_path / "absent_dora.py")], tmp_path, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "missing" in proc.stderr and "fetch_reference.py" in proc.stderr
    assert "not an interactive terminal" in proc.stderr
    assert not list(tmp_path.glob("*.json"))


def test_bad_flag_exits_with_message(tmp_path):
    proc = _run(["--dtype", "fp8"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "unknown dtype 'fp8'" in proc.stderr and "bf16" in proc.stderr


def test_list_prints_plan_and_runs_nothing(tmp_path, capsys):
    from bench.cli import main

    assert main(["--list", "--suite", "all", "--device", "cpu", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "providers:" in text and "peft_ref" in text and "ours_auto" in text
    for suite in ("norm/", "compose/", "layer/", "memory/", "stability/", "model/"):
        assert suite in text
    assert re.search(r"cases \(\d+\):", text)
    assert not list(tmp_path.glob("*.json"))


# ---------------------------------------------------------------------------------------------
# timing and statistics
# ---------------------------------------------------------------------------------------------


def test_percentile_matches_linear_interpolation():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 25) == pytest.approx(1.75)
    assert percentile([7.0], 30) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_summarize_median_spread():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median, stats.min, stats.max, stats.n) == (3.0, 1.0, 5.0, 5)
    assert (stats.q25, stats.q75, stats.iqr) == (2.0, 4.0, 2.0)
    assert stats.mean == 3.0
    assert stats.spread() == {"iqr": 2.0, "q25": 2.0, "q75": 4.0, "min": 1.0, "max": 5.0, "n": 5}
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0, math.nan])


def test_measure_counts_calls_rotates_and_runs_before_untimed():
    calls, befores = [], []
    stats = measure(lambda i: calls.append(i), device=torch.device("cpu"), warmup=2, repeats=5,
                    before=lambda i: befores.append(i))
    assert calls == list(range(7)) and befores == list(range(7))  # i rotates inputs across all calls
    assert stats.n == 5 and stats.min >= 0 and stats.min <= stats.median <= stats.max
    with pytest.raises(ValueError):
        measure(lambda i: None, device=torch.device("cpu"), warmup=0, repeats=0)


def test_measure_excludes_before_from_timing():
    import time

    stats = measure(lambda i: None, device=torch.device("cpu"), warmup=0, repeats=3,
                    before=lambda i: time.sleep(0.05))
    assert stats.max < 40.0  # ms: the 50 ms sleep happened outside the timed region


def test_rotation_count_bounds():
    cpu = torch.device("cpu")
    assert rotation_count(1 << 30, cpu) == 2  # big inputs: two suffice
    assert rotation_count(1024, cpu) == 8  # tiny inputs: capped
    assert rotation_count(1 << 20, cpu, free_bytes=8 << 20) == 2
    with pytest.raises(ValueError):
        rotation_count(0, cpu)


def test_compare_metrics():
    ref = torch.tensor([1.0, 2.0, 2.0])
    err = compare(ref * 1.01, ref)
    assert err["rel_rms"] == pytest.approx(0.01) and err["cosine"] == pytest.approx(1.0)
    assert err["max_abs"] == pytest.approx(0.02)
    bad = compare(torch.tensor([1.0, math.inf, 0.0]), ref)
    assert bad["finite"] == 0.0 and math.isinf(bad["rel_rms"])


# ---------------------------------------------------------------------------------------------
# SHA-1 start-up validation
# ---------------------------------------------------------------------------------------------


def test_sha1_good_file(tmp_path):
    f = tmp_path / "ref.py"
    f.write_bytes(b"print('reference')\n")
    assert startup.check_file_sha1(f, hashlib.sha1(f.read_bytes()).hexdigest()) is None


def test_sha1_bad_file(tmp_path):
    f = tmp_path / "ref.py"
    f.write_bytes(b"tampered\n")
    problem = startup.check_file_sha1(f, "0" * 40)
    assert problem is not None and problem.recoverable
    assert hashlib.sha1(b"tampered\n").hexdigest() in problem.what and "0" * 40 in problem.what
    assert any(cmd.startswith(f"rm {f}") and "fetch_reference.py" in cmd for cmd in problem.fix)


def test_sha1_missing_file(tmp_path):
    problem = startup.check_file_sha1(tmp_path / "nope.py", "0" * 40)
    assert problem is not None and "missing" in problem.what
    assert any("fetch_reference.py" in cmd and f"cd {startup.REPO_ROOT}" in cmd for cmd in problem.fix)


def test_check_environment_uses_the_given_reference(tmp_path):
    problems, info = startup.check_environment(tmp_path / "absent.py")
    assert info["sha1_ok"] is False and info["path"] == str(tmp_path / "absent.py")
    assert any("missing" in p.what for p in problems)


def test_resolve_problems_prompts_only_when_interactive():
    problem = startup.Problem("upstream reference missing: x", ("fix it",))
    out = io.StringIO()
    assert startup.resolve_problems([], interactive=False, stream=out)
    assert not startup.resolve_problems([problem], interactive=False, stream=out,
                                        ask=lambda _q: pytest.fail("asked without a terminal"))
    assert "fix it" in out.getvalue()
    assert startup.resolve_problems([problem], interactive=True, stream=out, ask=lambda q: "y")
    assert not startup.resolve_problems([problem], interactive=True, stream=out, ask=lambda q: "")
    assert not startup.resolve_problems([problem], interactive=True, stream=out, ask=lambda q: "no")
    fatal = startup.Problem("package missing", ("pip install",), recoverable=False)
    assert not startup.resolve_problems([fatal], interactive=True, stream=out, ask=lambda q: "y")


# ---------------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--suite", "nope"], "unknown suite 'nope'"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--ranks", "0"], "rank 0 must be in [1, 4096]"),
        (["--ranks", "16,abc"], "rank 'abc' is not an integer"),
        (["--ranks", ""], "empty rank list"),
        (["--shapes", "12"], "shape '12' is neither"),
        (["--shapes", "0x5"], "shape '0x5' is neither"),
        (["--models", "llama"], "unknown model 'llama'"),
        (["--providers", "ours"], "unknown provider 'ours'"),
        (["--layers", "0"], "--layers 0 must be >= 1"),
        (["--repeats", "0"], "--repeats 0 must be >= 1"),
        (["--warmup", "-1"], "--warmup -1 must be >= 0"),
        (["--seqlen", "64", "--loss-tokens", "65"], "--loss-tokens 65 exceeds --seqlen 64"),
        (["--tag", "a b"], "--tag 'a b'"),
        (["--device", "cuda"], "no CUDA device"),
        (["--quant", "int4"], "unknown --quant 'int4'"),
        (["--quant", "nf4", "--suite", "micro"], "--quant nf4 applies to the model suite only"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
def test_bad_flags_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, cuda_available=False)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_and_profiles_resolve(tmp_path):
    cfg = parse_args(["--suite", "micro,model", "--dtype", "bf16,fp32", "--ranks", "8,8,16", "--out", str(tmp_path)],
                     cuda_available=False)
    assert cfg.suites == ["norm", "compose", "layer", "memory", "stability", "model"]
    assert cfg.dtypes == ["bf16", "fp32"] and cfg.ranks == [8, 16]
    assert cfg.profile == "smoke" and cfg.cpu_fallback  # no CUDA: the smoke profile
    full = parse_args(["--suite", "layer", "--shapes", "4096x4096,ragged,100x300"], cuda_available=True)
    assert full.profile == "full" and full.tokens == 4096 and full.loss_tokens == 1024
    assert full.shapes == {"4096x4096": (4096, 4096), "ragged": (4097, 3003), "100x300": (100, 300)}
    assert full.ranks_for("layer") == [16, 128, 384, 768] and full.ranks_for("model") == [384]
    assert full.timing_for("layer") == (20, 5) and full.timing_for("model") == (3, 1)
    assert not parse_args(["--no-gradient-checkpointing", "--no-autocast"], cuda_available=True).autocast


# ---------------------------------------------------------------------------------------------
# results: schema, ratios, names
# ---------------------------------------------------------------------------------------------


def _doc(rows):
    env = {"device": "cpu", "gpu": None, "compute_capability": None, "driver": None, "cuda": None, "torch": "x",
           "triton": None, "peft": "0.18.0", "transformers": "5", "command_line": "python b.py", "git_commit": None}
    run = {"started": "t", "finished": "t", "duration_s": 1.0, "suites": ["layer"], "dtypes": ["bf16"],
           "profile": "smoke", "timer": "time.perf_counter", "cpu_fallback": True, "autocast": True, "settings": {},
           "reference": {}, "notes": []}
    return {"schema_version": 1, "environment": env, "run": run,
            "providers": [{"name": "lora", "label": "LoRA", "kind": "lora", "available": True, "reason": None}],
            "rows": rows}


def test_recorder_ratios_and_schema():
    rec = Recorder()
    case = Case("layer", "fwd", {"d_in": 8, "d_out": 8, "r": 4, "T": 16}, "bf16")
    spread = summarize([1.0, 2.0, 3.0]).spread()
    rec.add(case, "peft_ref", "time", 4.0, "ms", spread=spread)
    rec.add(case, "lora", "time", 2.0, "ms", spread=spread)
    rec.add(case, "ours_auto", "time", 3.0, "ms", spread=spread)
    rec.skip(case, "ours_fused", "time", "ms", "no CUDA")
    rec.add(case, "ours_eager", "time", math.inf, "ms")  # non-finite: kept, marked failed
    rec.add_ratios()
    ours = rec.rows[2]
    assert ours["ratio_vs_ref"] == 0.75 and ours["ratio_vs_lora"] == 1.5
    assert rec.rows[4]["status"] == "failed" and rec.rows[4]["value"] is None
    doc = _doc(rec.rows)
    assert validate(doc) == []
    json.dumps(doc, allow_nan=False)


def test_validate_reports_violations():
    good = {"suite": "layer", "case": "fwd", "shape": {"d_in": 8}, "dtype": "bf16", "provider": "lora",
            "metric": "time", "value": 1.0, "unit": "ms", "spread": None, "status": "ok", "note": None}
    assert validate(_doc([good])) == []
    bad_rows = [
        dict(good, suite="bogus"),
        dict(good, status="meh"),
        dict(good, status="skipped", value=None, note=None),
        dict(good, value="1.0"),
        dict(good, spread={"iqr": 1.0}),
        dict(good, shape={"d_in": [1, 2]}),
        {k: v for k, v in good.items() if k != "unit"},
    ]
    errors = validate(_doc(bad_rows))
    for i in range(len(bad_rows)):
        assert any(e.startswith(f"rows[{i}]") for e in errors), (i, errors)
    assert validate({"schema_version": 2}) != []
    broken = _doc([good])
    broken["run"]["timer"] = "stopwatch"
    assert any("run.timer" in e for e in validate(broken))


def test_output_path_names_and_never_overwrites(tmp_path):
    import datetime as dt

    when = dt.datetime(2026, 1, 2, 3, 4, 5)
    env = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}
    first = output_path(tmp_path, env, "micro", "bf16", None, when)
    assert first.name == "h100-80gb-hbm3_micro_bf16_20260102-030405.json"
    first.write_text("{}")
    second = output_path(tmp_path, env, "micro", "bf16", None, when)
    assert second != first and second.name.endswith("-2.json")
    named = output_path(tmp_path, {"device": "cpu"}, "all", "bf16", "x1", when)
    assert named.name == "cpu_all_bf16_20260102-030405_x1.json"


# ---------------------------------------------------------------------------------------------
# model registry
# ---------------------------------------------------------------------------------------------


def test_model_counts_match_design_table_at_full_depth():
    """DESIGN.md's module and trainable-parameter counts at r=384, built on the meta device."""
    from bench.models import MODELS, build_config, meta_counts

    for spec in MODELS.values():
        _cfg, _depth, reason = build_config(spec)
        if reason:
            pytest.skip(reason)
        assert meta_counts(spec, 384) == (spec.expected_modules, spec.expected_trainable), spec.name


def test_peft_counts_agree_with_analytic_counts_on_meta():
    """PEFT's own DoRA wrapping of Qwen3-VL-8B at full depth gives the table's counts (no memory used)."""
    from bench.models import MODELS, build_config, dora_counts
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    spec = MODELS["qwen3-vl-8b"]
    config, depth, _ = build_config(spec)
    assert depth == 36
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=384, use_dora=True, target_modules=list(spec.targets)))
    assert dora_counts(model) == (252, 1_048_928_256)


def test_build_config_layers_and_hybrid_pattern():
    from bench.models import MODELS, build_config

    config, depth, _ = build_config(MODELS["qwen2.5-vl-32b"], layers=16)
    assert depth == 16 and config.num_hidden_layers == 16 and config.hidden_size == 5120
    config, depth, _ = build_config(MODELS["qwen3-vl-8b"], layers=1000)
    assert depth == 36  # clamped to the published depth
    config, depth, reason = build_config(MODELS["qwen3.5-27b"], layers=8)
    if reason:
        pytest.skip(reason)
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"]


def test_summary_plain_text():
    from bench.report import print_summary

    rows = []
    for provider, value in (("lora", 2.0), ("peft_ref", 4.0), ("ours_auto", 2.2)):
        rows.append({"suite": "layer", "case": "fwd", "shape": {"d_in": 8, "d_out": 8, "r": 4, "T": 16},
                     "dtype": "bf16", "provider": provider, "metric": "time", "value": value, "unit": "ms",
                     "spread": None, "status": "ok", "note": None, "ratio_vs_ref": value / 4.0,
                     "ratio_vs_lora": value / 2.0})
    out = io.StringIO()
    print_summary(rows, stream=out)
    text = out.getvalue()
    assert "== layer" in text and "8x8 r4 T16" in text and "0.550x" in text and "1.100x" in text


def test_environment_names_the_commit_given_over_the_checkouts(monkeypatch):
    # the device tool's copy of the tree may carry a stale .git: the commit passed in wins
    from bench.results import environment

    monkeypatch.setenv("BENCH_GIT_COMMIT", "0123abc")
    assert environment(torch.device("cpu"), [])["git_commit"] == "0123abc"
    monkeypatch.delenv("BENCH_GIT_COMMIT")
    assert environment(torch.device("cpu"), [])["git_commit"] != "0123abc"


def test_window_ab_smoke_writes_agreement_and_ratios(tmp_path):
    """code/scripts/window_ab.py end to end at tiny dimensions: every variant agrees with the plain path
    (on the CPU the gates change nothing) and gets a median window and a ratio to LoRA."""
    out = tmp_path / "ab.json"
    cmd = [sys.executable, str(CODE / "scripts/window_ab.py"), "--smoke", "--ranks", "4", "--seqlen", "16",
           "--loss-tokens", "4", "--grad-accum", "2", "--repeats", "1", "--variants", "plain,both", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    entry = json.loads(out.read_text())["ranks"]["4"]
    assert entry["agreement"] == {"plain_vs_plain": 0.0, "both": 0.0}
    assert set(entry["median_ms"]) == {"lora", "plain", "both"}
    assert entry["ratio_vs_lora"]["lora"] == 1.0 and entry["ratio_vs_lora"]["both"] > 0


def test_nested_peak_memory_windows_keep_the_outer_peak(monkeypatch):
    """A step's window holding a forward and a backward window reports the forward's peak, not only
    what lives at the backward's start plus the backward's peak (the inner windows reset the
    allocator's peak statistic). Simulated allocator: no GPU needed."""
    from bench import memory

    sim = {"allocated": 100, "peak": 100}

    def alloc(nbytes):
        sim["allocated"] += nbytes
        sim["peak"] = max(sim["peak"], sim["allocated"])

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: sim["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: sim["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: sim.update(peak=sim["allocated"]))
    device = torch.device("cuda")
    with memory.PeakMemory(device) as step:
        with memory.PeakMemory(device) as fwd:
            alloc(90)   # the forward's transient peak
            alloc(-60)  # 30 kept for the backward
        with memory.PeakMemory(device) as bwd:
            alloc(20)
            alloc(-20)
    assert (fwd.peak_extra, bwd.peak_extra) == (90, 20)
    assert step.peak_extra == 90  # not 30 + 20
    with memory.PeakMemory(device) as window:
        alloc(50)
        alloc(-50)
        window.restart()  # a restart drops the window's own earlier peak on purpose
        alloc(10)
    assert window.peak_extra == 10 and not memory._open_windows
