#!/usr/bin/env python
"""Draw the paper's benchmark figures from the committed JSON results.

Usage::

    python paper/generate_figures.py [--results DIR] [--out DIR] [--png]

``--results`` defaults to ``code/results/`` and ``--out`` to ``paper/figures/``, both resolved
relative to this script, so the command works from any working directory. PDFs are always
written; ``--png`` adds a PNG of each figure (150 dpi).

Input: the harness's JSON documents (``code/results/SCHEMA.md``, ``schema_version`` 1), and
optionally ``fused_check*.json`` written by ``code/scripts/gpu_fused_check.py`` (its own format:
``meta``, ``copy``, ``rows`` with ``suite``/``d_out``/``gbps``/``fraction_of_copy_bw``). Other JSON
files (profiles, ...) are ignored.

Which file is current: for every (GPU, suite, dtype, tag) the newest document (by ``run.started``,
else by file name) wins, so a re-run of a suite under the same ``--tag`` supersedes the older one;
different tags (``qwen3-vl-8b-r16`` and ``...-r384``) are kept side by side.

Figures (each title names the GPU and dtype the data came from):

- ``norm_time_memory``: row-norm time and peak extra memory against rank and against shape,
  per provider and case;
- ``compose_bandwidth``: compose forward/backward GB/s against the measured copy bandwidth
  (the roofline of a memory-bound elementwise kernel);
- ``fused_kernels_bandwidth``: the fused kernels' fraction of copy bandwidth (fused_check JSON);
- ``layer_speedup``: one adapted linear, forward / forward+backward / forward+backward inside an
  accumulation window / forward+backward as GPU busy time (where the run has it): speedup against
  the reference (PEFT 0.18.0 DoRA) and time / LoRA time, from one GPU and dtype (bf16 first);
- ``model_speedup``: whole-model inference and gradient (one accumulation window) speedups
  against the reference, per model and rank;
- ``model_memory``: whole-model peak extra memory per provider;
- ``stability``: relative RMS error against fp64 of y, dx, dA, dB, dm per provider and dtype.

A figure whose data is missing is reported on stdout (``[missing] ...``) and skipped; the others
are still drawn. The exit status is 0 unless no figure at all could be drawn.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import LogFormatter

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = os.path.normpath(os.path.join(HERE, "..", "code", "results"))
DEFAULT_OUT = os.path.join(HERE, "figures")

PROVIDER_ORDER = [
    "base", "lora", "peft_ref", "peft_installed", "peft_cache",
    "ours_eager", "ours_fused", "ours_auto",
]
LABELS = {
    "base": "base (no adapter)",
    "lora": "LoRA",
    "peft_ref": "PEFT 0.18.0 DoRA (ref)",
    "peft_installed": "PEFT installed DoRA",
    "peft_cache": "PEFT DoRA + caching",
    "ours_eager": "ours eager",
    "ours_fused": "ours fused",
    "ours_auto": "ours auto",
    "torch_copy": "torch copy",
    "fused_kernel_layer": "fused kernel alone, layer path (base kept for ∂m)",
    "fused_kernel_v32": "fused kernel alone, v kept in fp32",
}
COLORS = {
    "base": "#7f7f7f", "lora": "#bcbd22", "peft_ref": "#1f77b4", "peft_installed": "#17becf",
    "peft_cache": "#9467bd", "ours_eager": "#ff7f0e", "ours_fused": "#d62728",
    "ours_auto": "#2ca02c", "fused_kernel_layer": "#8c564b", "fused_kernel_v32": "#e377c2",
}
MARKERS = {
    "base": "x", "lora": "v", "peft_ref": "o", "peft_installed": "s", "peft_cache": "D",
    "ours_eager": "^", "ours_fused": "P", "ours_auto": "*", "fused_kernel_layer": "<", "fused_kernel_v32": ">",
}
GB = 1e9

plt.rcParams.update({
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.titlesize": 10,
    "axes.grid": True, "grid.alpha": 0.3, "pdf.fonttype": 42,
})


# --------------------------------------------------------------------------------------------
# loading


class Results:
    """The current rows of every harness document in a directory, plus fused_check documents."""

    def __init__(self, rows, fused_checks, files):
        self.rows = rows                  # list of row dicts, each with "_gpu" and "_file"
        self.fused_checks = fused_checks  # list of (path, doc)
        self.files = files                # the harness files actually used

    def select(self, **kw):
        out = []
        for r in self.rows:
            if r.get("status") != "ok" or r.get("value") is None:
                continue
            if all(r.get(k) == v for k, v in kw.items()):
                out.append(r)
        return out


def _gpu_name(doc):
    env = doc.get("environment") or {}
    if env.get("gpu"):
        return env["gpu"]
    return "CPU (no GPU: timings say nothing about GPU speed)"


def load_results(results_dir):
    docs = []
    fused = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            print(f"[warn] cannot read {path}: {e}")
            continue
        if not isinstance(doc, dict):
            continue
        if doc.get("schema_version") == 1 and isinstance(doc.get("rows"), list):
            docs.append((path, doc))
        elif "meta" in doc and isinstance(doc.get("rows"), list) and "copy" in doc:
            fused.append((path, doc))
    # newest document per (gpu, suite, dtype, tag)
    best = {}
    for path, doc in docs:
        run = doc.get("run") or {}
        tag = (run.get("settings") or {}).get("tag")
        stamp = (run.get("started") or "", os.path.basename(path))
        gpu = _gpu_name(doc)
        for suite in {r.get("suite") for r in doc["rows"]}:
            for dtype in {r.get("dtype") for r in doc["rows"] if r.get("suite") == suite}:
                key = (gpu, suite, dtype, tag)
                if key not in best or stamp > best[key][0]:
                    best[key] = (stamp, path, doc)
    rows = []
    used = set()
    for (gpu, suite, dtype, _tag), (_stamp, path, doc) in sorted(best.items(), key=str):
        used.add(path)
        for r in doc["rows"]:
            if r.get("suite") == suite and r.get("dtype") == dtype:
                r = dict(r)
                r["_gpu"] = gpu
                r["_file"] = os.path.basename(path)
                rows.append(r)
    return Results(rows, fused, sorted(used))


# --------------------------------------------------------------------------------------------
# helpers


class Missing(Exception):
    pass


def _providers_in(rows):
    present = {r["provider"] for r in rows}
    return [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))


def _source(rows):
    gpus = sorted({r["_gpu"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    return f"{', '.join(gpus)}, {', '.join(dtypes)}"


def _shape_label(s):
    return f"{s['d_out']}×{s['d_in']}"


def _save(fig, out_dir, name, png):
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name + ".pdf")]
    fig.savefig(paths[0], bbox_inches="tight", metadata={"CreationDate": None})
    if png:
        paths.append(os.path.join(out_dir, name + ".png"))
        fig.savefig(paths[1], dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


class _PlainLogFormatter(LogFormatter):
    """LogFormatter's choice of which ticks to label, printed as %g."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def _plain_log(ax):
    """Log y axis with plain tick labels (0.2, 0.5, 3) instead of 2×10^-1."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLogFormatter())
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(minor_thresholds=(1.5, 0.6)))


def _legend_below(fig, axes, ncol=4):
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(ncol, len(labels)),
               bbox_to_anchor=(0.5, -0.01), frameon=False)


# --------------------------------------------------------------------------------------------
# figures


def fig_norm(res, out, png):
    rows = res.select(suite="norm")
    if not rows:
        raise Missing("no 'norm' suite rows (run bench_dora_comprehensive.py --suite norm)")
    rows = _one_source(rows)  # one GPU and dtype: a point per (case, provider, shape)
    series = [(c, p) for c in ("row_norm", "row_norm_as_forward")
              for p in _providers_in([r for r in rows if r["case"] == c])]
    shapes = sorted({(r["shape"]["d_in"], r["shape"]["d_out"]) for r in rows},
                    key=lambda s: s[0] * s[1])
    ranks = sorted({r["shape"]["r"] for r in rows})
    fix_shape = (4096, 4096) if (4096, 4096) in shapes else shapes[0]
    fix_rank = 384 if 384 in ranks else ranks[-1]

    def val(case, prov, metric, d_in, d_out, r):
        for x in rows:
            s = x["shape"]
            if (x["case"], x["provider"], x["metric"]) == (case, prov, metric) and \
                    (s["d_in"], s["d_out"], s["r"]) == (d_in, d_out, r):
                return x["value"]
        return None

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.2))
    for col, (metric, ylabel, scale) in enumerate([
            ("time", "time (ms)", 1.0), ("peak_extra_mem", "peak extra memory (MB)", 1e6)]):
        ax = axes[0][col]
        for case, prov in series:
            ys = [val(case, prov, metric, *fix_shape, r) for r in ranks]
            ys = [None if y is None else y / scale for y in ys]
            ax.plot(ranks, [math.nan if y is None else y for y in ys],
                    marker=MARKERS.get(prov, "o"), color=COLORS.get(prov),
                    ls="-" if case == "row_norm" else "--",
                    label=f"{LABELS.get(prov, prov)}, {case}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel(f"rank r (shape d_out×d_in = {fix_shape[1]}×{fix_shape[0]})")
        ax.set_ylabel(ylabel)
        _plain_log(ax)
        ax = axes[1][col]
        xs = range(len(shapes))
        for case, prov in series:
            ys = [val(case, prov, metric, d_in, d_out, fix_rank) for d_in, d_out in shapes]
            ax.plot(xs, [math.nan if y is None else y / scale for y in ys],
                    marker=MARKERS.get(prov, "o"), color=COLORS.get(prov),
                    ls="-" if case == "row_norm" else "--")
        ax.set_xticks(list(xs), [f"{o}×{i}" for i, o in shapes])
        ax.set_xlabel(f"shape d_out×d_in (rank r = {fix_rank})")
        ax.set_ylabel(ylabel)
        _plain_log(ax)
    fig.suptitle(f"DoRA weight-norm: time and peak extra memory — {_source(rows)}\n"
                 "solid: norm as get_weight_norm computes it; dashed: norm as the forward "
                 "computes it (fp32)")
    _legend_below(fig, [axes[0][0]], ncol=2)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return _save(fig, out, "norm_time_memory", png)


def _compose_rows(res):
    """(whole-call rows, kernel-only rows, copy rows) of the compose suite, all of one GPU and dtype
    (bf16 first): a line or a roofline from another run would mean nothing beside them."""
    rows = res.select(suite="compose", metric="bandwidth")
    calls = [r for r in rows if r["case"] in ("fwd", "bwd")]
    if not calls:
        raise Missing("no 'compose' suite bandwidth rows")
    calls = _one_source(calls)
    source = (calls[0]["_gpu"], calls[0]["dtype"])

    def same(rs):
        return [r for r in rs if (r["_gpu"], r["dtype"]) == source]

    # kernel-only rows (CUDA-graph replay, bytes actually moved), where the run recorded them
    kernel = [r for r in res.select(suite="compose", metric="kernel_bandwidth") if r["case"] in ("fwd", "bwd")]
    return calls, same(kernel), same([r for r in rows if r["case"] == "copy_bandwidth"])


def fig_compose(res, out, png):
    rows, kernel_rows, copy = _compose_rows(res)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, case, passes in zip(axes, ("fwd", "bwd"), (3, 5)):
        sub = [r for r in rows if r["case"] == case]
        douts = sorted({r["shape"]["d_out"] for r in sub})
        xs = list(range(len(douts)))
        # solid: whole calls (nominal traffic); dashed: the kernels alone
        for series, ls in ((sub, "-"), ([r for r in kernel_rows if r["case"] == case], "--")):
            for prov in _providers_in(series):
                ys = []
                for d in douts:
                    v = [r for r in series if r["provider"] == prov and r["shape"]["d_out"] == d]
                    ys.append(v[0]["value"] if v else math.nan)
                ax.plot(xs, ys, marker=MARKERS.get(prov, "o"), color=COLORS.get(prov), ls=ls,
                        label=LABELS.get(prov, prov))
        if copy:
            ax.axhline(copy[0]["value"], color="k", ls="--", lw=1,
                       label=f"copy bandwidth (roofline), {copy[0]['value']:.0f} GB/s")
        T = sub[0]["shape"].get("T") if sub else None
        ax.set_xticks(xs, [str(d) for d in douts])
        ax.set_xlabel(f"d_out (T = {T} tokens)")
        ax.set_title(f"compose {'forward' if case == 'fwd' else 'backward'} "
                     f"({passes} passes of T·d_out)")
    top = max((y for ax in axes for line in ax.get_lines() for y in line.get_ydata()
               if isinstance(y, (int, float)) and math.isfinite(y)), default=1.0)
    axes[0].set_ylim(0, 1.08 * top)  # shared y: one limit that shows every series
    axes[0].set_ylabel("achieved bandwidth (GB/s)")
    note = ("\nsolid: whole call incl. host overhead, nominal traffic; dashed: kernel alone "
            "(CUDA-graph replay), bytes it moves") if kernel_rows else ""
    fig.suptitle(f"DoRA compose kernel bandwidth against the copy roofline — {_source(rows)}{note}")
    _legend_below(fig, axes, ncol=4 if kernel_rows else 5)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return _save(fig, out, "compose_bandwidth", png)


def fig_fused_kernels(res, out, png):
    if not res.fused_checks:
        raise Missing("no fused_check*.json (python code/scripts/gpu_fused_check.py --out ...)")
    path, doc = max(res.fused_checks, key=lambda x: x[0])
    meta = doc.get("meta", {})
    rows = [r for r in doc["rows"] if str(r.get("suite", "")).startswith("compose")
            and r.get("fraction_of_copy_bw") is not None]
    if not rows:
        raise Missing(f"{os.path.basename(path)} has no compose rows")
    suites = sorted({r["suite"] for r in rows})
    douts = sorted({r["d_out"] for r in rows})
    xs = list(range(len(douts)))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, s in enumerate(suites):
        ys = []
        for d in douts:
            v = [r for r in rows if r["suite"] == s and r["d_out"] == d]
            ys.append(100 * v[0]["fraction_of_copy_bw"] if v else math.nan)
        ax.plot(xs, ys, marker="os^DvP*"[i % 7], label=s.replace("compose_", ""))
    goal = meta.get("bw_goal_fraction_of_copy")
    if goal:
        ax.axhline(100 * goal, color="k", ls=":", lw=1, label=f"goal {100 * goal:.0f}% of copy")
    ax.axhline(100, color="k", ls="--", lw=1,
               label=f"copy bandwidth {doc['copy'].get('gbps', float('nan')):.0f} GB/s")
    T = meta.get("args", {}).get("tokens")
    ax.set_xticks(xs, [str(d) for d in douts])
    ax.set_xlabel(f"d_out (T = {T} tokens)")
    ax.set_ylabel("bandwidth (% of copy bandwidth)")
    ax.set_ylim(0, 110)
    dtype = meta.get("args", {}).get("dtype", "?")
    ax.set_title(f"Fused compose kernels (gpu_fused_check) — {meta.get('gpu', '?')}, {dtype}")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return _save(fig, out, "fused_kernels_bandwidth", png)


def _config_key(s):
    return (s["d_in"] * s["d_out"], s["d_out"], s["d_in"], s["r"])


def _one_source(rows, prefer_dtype="bf16"):
    """The rows of one (GPU, dtype): lines joining points of different GPUs or dtypes mean nothing.
    bf16 first (what users train in), then the source with the most rows."""
    counts = {}
    for r in rows:
        key = (r["_gpu"], r["dtype"])
        counts[key] = counts.get(key, 0) + 1
    gpu, dtype = min(counts, key=lambda k: (k[1] != prefer_dtype, -counts[k], k))
    return [r for r in rows if r["_gpu"] == gpu and r["dtype"] == dtype]


def fig_layer(res, out, png):
    rows = res.select(suite="layer", metric="time")
    if not rows:
        raise Missing("no 'layer' suite time rows")
    rows = _one_source(rows)
    cases = [c for c in ("fwd", "fwd_bwd", "fwd_bwd_accum", "fwd_bwd_device") if any(r["case"] == c for r in rows)]
    titles = {"fwd": "forward (inference, no_grad)", "fwd_bwd": "forward+backward",
              "fwd_bwd_accum": "forward+backward inside an accumulation window",
              "fwd_bwd_device": "forward+backward, GPU busy time only (host excluded)"}
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 2.9 * len(cases) + 1.0), squeeze=False)
    for i, case in enumerate(cases):
        sub = [r for r in rows if r["case"] == case]
        configs = sorted({tuple(sorted(r["shape"].items())) for r in sub},
                         key=lambda t: _config_key(dict(t)))
        index = {c: k for k, c in enumerate(configs)}
        provs = [p for p in _providers_in(sub) if p not in ("peft_ref", "base")]
        for j, (field, ylabel) in enumerate([
                ("ratio_vs_ref", "speedup vs reference (×)"),
                ("ratio_vs_lora", "time / LoRA time (×)")]):
            ax = axes[i][j]
            for prov in provs:
                if field == "ratio_vs_lora" and prov == "lora":
                    continue
                xs, ys = [], []
                for r in sub:
                    if r["provider"] != prov or r.get(field) in (None, 0):
                        continue
                    xs.append(index[tuple(sorted(r["shape"].items()))])
                    ys.append(1.0 / r[field] if field == "ratio_vs_ref" else r[field])
                order = sorted(range(len(xs)), key=xs.__getitem__)
                ax.plot([xs[k] for k in order], [ys[k] for k in order],
                        marker=MARKERS.get(prov, "o"), color=COLORS.get(prov), lw=0.8, ms=4,
                        label=LABELS.get(prov, prov))
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_ylabel(ylabel)
            ax.set_title(titles[case])
            labels = [f"{dict(c)['d_out']}×{dict(c)['d_in']} r{dict(c)['r']}" for c in configs]
            ax.set_xticks(range(len(configs)), labels, rotation=90)
            if field == "ratio_vs_lora":
                _plain_log(ax)
    T = rows[0]["shape"].get("T")
    for ax in axes[-1]:
        ax.set_xlabel(f"layer d_out×d_in and rank r (T = {T} tokens)")
    fig.suptitle(f"One DoRA linear layer: speedup against PEFT 0.18.0 DoRA and cost relative "
                 f"to LoRA — {_source(rows)}")
    _legend_below(fig, axes.flatten(), ncol=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, out, "layer_speedup", png)


def _model_groups(rows):
    keys = sorted({(r["shape"].get("model"), r["shape"].get("r"), r["shape"].get("layers"))
                   for r in rows}, key=lambda k: (str(k[0]), k[1] or 0))
    return keys


def _grouped_bars(ax, rows, provs, groups, value_fn):
    width = 0.8 / max(len(provs), 1)
    for k, prov in enumerate(provs):
        ys = []
        for g in groups:
            v = [r for r in rows if r["provider"] == prov and
                 (r["shape"].get("model"), r["shape"].get("r"), r["shape"].get("layers")) == g]
            ys.append(value_fn(v[0]) if v else math.nan)
        xs = [i + (k - (len(provs) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, ys, width, color=COLORS.get(prov), label=LABELS.get(prov, prov))
        for b, y in zip(bars, ys):
            if not math.isnan(y):
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center",
                            va="bottom", fontsize=6, rotation=90, xytext=(0, 2),
                            textcoords="offset points")
    ax.set_xticks(range(len(groups)),
                  [f"{m}\nr={r}, {n} layers" for m, r, n in groups])


def fig_model_speedup(res, out, png):
    rows = [r for r in res.select(suite="model", metric="time")
            if r["case"] in ("inference", "gradient")]
    if not rows:
        raise Missing("no 'model' suite inference/gradient time rows")
    groups = _model_groups(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, case in zip(axes, ("inference", "gradient")):
        sub = [r for r in rows if r["case"] == case and r.get("ratio_vs_ref")]
        provs = [p for p in _providers_in(sub) if p != "peft_ref"]
        _grouped_bars(ax, sub, provs, groups, lambda r: 1.0 / r["ratio_vs_ref"])
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_ylabel("speedup vs PEFT 0.18.0 DoRA (×, higher is faster)")
        ax.set_title("inference (one forward)" if case == "inference"
                     else "gradient (one accumulation window, fwd+bwd)")
        ax.margins(y=0.15)
    fig.suptitle(f"Whole-model speedups — {_source(rows)}")
    _legend_below(fig, axes, ncol=7)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(fig, out, "model_speedup", png)


def fig_model_memory(res, out, png):
    rows = [r for r in res.select(suite="model", metric="peak_extra_mem")
            if r["case"] in ("inference", "gradient")]
    if not rows:
        raise Missing("no 'model' suite peak_extra_mem rows")
    groups = _model_groups(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, case in zip(axes, ("inference", "gradient")):
        sub = [r for r in rows if r["case"] == case]
        _grouped_bars(ax, sub, _providers_in(sub), groups, lambda r: r["value"] / GB)
        ax.set_ylabel("peak memory above the phase's start (GB)")
        ax.set_title("inference (one forward)" if case == "inference"
                     else "gradient (one accumulation window)")
        ax.margins(y=0.15)
    fig.suptitle(f"Whole-model peak extra memory per provider — {_source(rows)}")
    _legend_below(fig, axes, ncol=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(fig, out, "model_memory", png)


def fig_stability(res, out, png):
    rows = [r for r in res.select(suite="stability") if r["metric"].endswith("_rel_rms")]
    if not rows:
        raise Missing("no 'stability' suite rel_rms rows")
    dtypes = sorted({r["dtype"] for r in rows})
    quantities = [q for q in ("y", "dx", "dA", "dB", "dm")
                  if any(r["metric"] == f"{q}_rel_rms" for r in rows)]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7.5 * len(dtypes), 4.0), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        sub = [r for r in rows if r["dtype"] == dtype]
        provs = _providers_in(sub)
        width = 0.8 / len(provs)
        for k, prov in enumerate(provs):
            med, lo, hi = [], [], []
            for q in quantities:
                vals = [r["value"] for r in sub
                        if r["provider"] == prov and r["metric"] == f"{q}_rel_rms"]
                if vals:
                    m = statistics.median(vals)
                    med.append(m)
                    lo.append(m - min(vals))
                    hi.append(max(vals) - m)
                else:
                    med.append(math.nan)
                    lo.append(0)
                    hi.append(0)
            xs = [i + (k - (len(provs) - 1) / 2) * width for i in range(len(quantities))]
            ax.bar(xs, med, width, color=COLORS.get(prov), label=LABELS.get(prov, prov),
                   yerr=[lo, hi], capsize=2, error_kw={"lw": 0.7})
        ax.set_xticks(range(len(quantities)), quantities)
        ax.set_xlabel("output / gradient")
        ax.set_ylabel("relative RMS error vs fp64 (1)")
        _plain_log(ax)
        nshapes = len({tuple(sorted(r["shape"].items())) for r in sub})
        ax.set_title(f"{dtype}: median over {nshapes} shapes/ranks, whiskers min–max")
    fig.suptitle(f"Numerical error against an fp64 evaluation (near-unity regime) — "
                 f"{_source(rows)}")
    _legend_below(fig, axes[0], ncol=6)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(fig, out, "stability", png)


FIGURES = [
    ("norm_time_memory", fig_norm),
    ("compose_bandwidth", fig_compose),
    ("fused_kernels_bandwidth", fig_fused_kernels),
    ("layer_speedup", fig_layer),
    ("model_speedup", fig_model_speedup),
    ("model_memory", fig_model_memory),
    ("stability", fig_stability),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=DEFAULT_RESULTS,
                    help="directory of benchmark JSON (default: code/results/)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: paper/figures/)")
    ap.add_argument("--png", action="store_true", help="also write PNGs")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.results):
        print(f"[error] results directory not found: {args.results}")
        return 2
    res = load_results(args.results)
    print(f"results: {args.results}")
    for f in res.files:
        print(f"  using {f}")
    for path, _ in res.fused_checks:
        print(f"  using {os.path.basename(path)} (fused_check)")
    drawn, missing = [], []
    for name, fn in FIGURES:
        try:
            paths = fn(res, args.out, args.png)
        except Missing as e:
            print(f"[missing] {name}: {e}; figure skipped")
            missing.append(name)
            continue
        drawn.append(name)
        for p in paths:
            print(f"[ok] {name}: {p}")
    print(f"drawn {len(drawn)} figure(s), missing {len(missing)}: {', '.join(missing) or '-'}")
    return 0 if drawn else 1


if __name__ == "__main__":
    sys.exit(main())
