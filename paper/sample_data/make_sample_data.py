#!/usr/bin/env python
"""Regenerate the tiny committed sample data that tests/test_figures.py runs the scripts on.

    python paper/sample_data/make_sample_data.py

- ``runs/demo/{eager,fused}_seed{0,1}/``: TensorBoard event files (tensorboard's own writer),
  40 steps of a synthetic decaying ``train/loss`` where fused = eager + a small seeded
  perturbation, and ``eval/loss`` every 10 steps;
- ``results/``: a subset of the committed H100 JSON under ``code/results/`` (one shape per
  suite, one model file, a trimmed fused_check), so generate_figures.py has a few KB to read.
  The ``norm`` suite is left out on purpose: the test checks the missing-data message.
"""

import json
import math
import os
import random
import shutil

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "..", "code", "results")


def write_scalars(logdir, series):
    os.makedirs(logdir, exist_ok=True)
    w = EventFileWriter(logdir)
    for tag, points in series.items():
        for step, value in points:
            ev = Event(wall_time=1.0e9 + step, step=step,
                       summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)]))
            w.add_event(ev)
    w.close()


def make_runs():
    root = os.path.join(HERE, "runs")
    shutil.rmtree(root, ignore_errors=True)
    for seed in (0, 1):
        rng = random.Random(seed)
        base = [3.0 * math.exp(-s / 15) + 1.0 + 0.05 * rng.random() for s in range(40)]
        ev = [(s, 1.2 + 2.0 * math.exp(-s / 20) + 0.01 * seed) for s in range(0, 40, 10)]
        pert = random.Random(100 + seed)
        write_scalars(os.path.join(root, "demo", f"eager_seed{seed}"),
                      {"train/loss": list(enumerate(base)), "eval/loss": ev})
        write_scalars(os.path.join(root, "demo", f"fused_seed{seed}"),
                      {"train/loss": [(s, v + pert.uniform(-1e-3, 1e-3)) for s, v in
                                      enumerate(base)],
                       "eval/loss": [(s, v + pert.uniform(-1e-4, 1e-4)) for s, v in ev]})


def _load(path):
    with open(path) as f:
        return json.load(f)


def _dump(doc, path):
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))


def trim(doc, keep):
    doc = dict(doc)
    drop = ("spread", "note", "extra")
    doc["rows"] = [{k: v for k, v in r.items() if k not in drop} for r in doc["rows"] if keep(r)]
    env = doc["environment"]
    doc["environment"] = {k: env.get(k) for k in ("device", "gpu", "torch", "triton", "cuda")}
    doc["run"] = {k: doc["run"].get(k) for k in ("started", "suites", "dtypes", "profile")}
    doc["run"]["settings"] = {"tag": "sample"}
    return doc


def make_results():
    out = os.path.join(HERE, "results")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    micro = _load(os.path.join(
        RESULTS, "h100-80gb-hbm3_micro_bf16_20261123-054309_micro-bf16.json"))
    shape = {"d_in": 4096, "d_out": 4096}
    doc = trim(micro, lambda r: r["suite"] in ("compose", "layer", "stability")
               and r["status"] == "ok" and r["metric"] not in ("correctness",)
               and r["shape"].get("r", 16) in (16, 384)
               and r["shape"].get("d_out", 4096) in (4096, 27648)
               and (r["suite"] == "compose" or all(r["shape"].get(k) == v
                                                   for k, v in shape.items()))
               and (r["suite"] != "stability" or r["metric"].endswith("rel_rms")))
    _dump(doc, os.path.join(out, "sample_micro_bf16.json"))
    model = _load(os.path.join(
        RESULTS, "h100-80gb-hbm3_model_bf16_20261123-064333_qwen3-vl-8b-r384.json"))
    doc = trim(model, lambda r: r["case"] in ("inference", "gradient")
               and r["metric"] in ("time", "peak_extra_mem"))
    _dump(doc, os.path.join(out, "sample_model_bf16.json"))
    fc = _load(os.path.join(RESULTS, "fused_check_h100.json"))
    fc = {"meta": {k: fc["meta"][k] for k in ("gpu", "args", "bw_goal_fraction_of_copy")},
          "copy": {"gbps": fc["copy"]["gbps"]},
          "rows": [{k: r[k] for k in ("suite", "d_out", "fraction_of_copy_bw")}
                   for r in fc["rows"] if r["suite"].startswith("compose")]}
    _dump(fc, os.path.join(out, "fused_check_sample.json"))


if __name__ == "__main__":
    make_runs()
    make_results()
