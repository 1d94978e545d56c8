#!/usr/bin/env python
"""Draw eager-vs-fused training loss curves from TensorBoard event files and print their gap.

Usage::

    python paper/generate_training_figure.py [--runs DIR] [--out DIR] [--png]

``--runs`` defaults to ``code/convergence_runs/`` and ``--out`` to ``paper/figures/``, both
resolved relative to this script.

Expected layout (one figure per run)::

    <runs>/<run>/eager_seed<k>/events.out.tfevents.*   # dorafactors with fused=False
    <runs>/<run>/fused_seed<k>/events.out.tfevents.*   # dorafactors with fused=True

Each seed directory holds the scalar tag ``train/loss`` (one value per optimizer step) and,
optionally, ``eval/loss`` (at intervals). If ``<runs>`` itself holds ``eager_seed*`` /
``fused_seed*`` directories it is treated as a single run. Events are read with tensorboard's
``EventAccumulator`` (all scalar events kept); when a step was logged twice the last value wins.

The figure ``training_<run>.pdf`` has two panels: per-step train loss of every eager and fused
seed (eval loss as markers when present), and the per-step difference fused − eager for each
seed. On stdout, per run, computed over every (seed, step) present in both the eager and the
fused run of that seed::

    mean |dloss| per step: <float>
    max |dloss| per step: <float>
    final eval |dloss|: mean <float>, max <float> over <n> seed(s)   (when eval/loss exists)

The final eval difference is taken at the last eval step common to eager and fused, per seed.
Exit status: 0 on success, 1 when no run (no seed pair with ``train/loss``) is found.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RUNS = os.path.normpath(os.path.join(HERE, "..", "code", "convergence_runs"))
DEFAULT_OUT = os.path.join(HERE, "figures")
SEED_DIR = re.compile(r"^(eager|fused)_seed(\d+)$")
TRAIN_TAG = "train/loss"
EVAL_TAG = "eval/loss"


def read_scalars(path):
    """{tag: {step: value}} for every scalar tag in the event files under `path`."""
    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return out


def find_runs(runs_dir):
    """{run_name: {(mode, seed): path}}."""
    def seeds_in(d):
        found = {}
        for name in sorted(os.listdir(d)):
            m = SEED_DIR.match(name)
            if m and os.path.isdir(os.path.join(d, name)):
                found[(m.group(1), int(m.group(2)))] = os.path.join(d, name)
        return found

    runs = {}
    if not os.path.isdir(runs_dir):
        return runs
    direct = seeds_in(runs_dir)
    if direct:
        runs[os.path.basename(os.path.normpath(runs_dir))] = direct
    for name in sorted(os.listdir(runs_dir)):
        d = os.path.join(runs_dir, name)
        if os.path.isdir(d) and not SEED_DIR.match(name):
            s = seeds_in(d)
            if s:
                runs[name] = s
    return runs


def loss_stats(data):
    """data: {seed: {"eager": scalars, "fused": scalars}} -> dict of statistics."""
    diffs = []
    eval_diffs = []
    for seed in sorted(data):
        e, f = data[seed]["eager"].get(TRAIN_TAG, {}), data[seed]["fused"].get(TRAIN_TAG, {})
        diffs += [abs(f[s] - e[s]) for s in sorted(set(e) & set(f))]
        ee, fe = data[seed]["eager"].get(EVAL_TAG, {}), data[seed]["fused"].get(EVAL_TAG, {})
        common = sorted(set(ee) & set(fe))
        if common:
            eval_diffs.append(abs(fe[common[-1]] - ee[common[-1]]))
    return {
        "n_pairs": len(diffs),
        "mean_abs": sum(diffs) / len(diffs) if diffs else float("nan"),
        "max_abs": max(diffs) if diffs else float("nan"),
        "eval_mean_abs": sum(eval_diffs) / len(eval_diffs) if eval_diffs else None,
        "eval_max_abs": max(eval_diffs) if eval_diffs else None,
        "n_eval_seeds": len(eval_diffs),
    }


def draw(run, data, out_dir, png):
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7.5, 6.0), sharex=True,
                                   gridspec_kw={"height_ratios": [2, 1]})
    cmap = plt.get_cmap("tab10")
    for i, seed in enumerate(sorted(data)):
        c = cmap(i % 10)
        e, f = data[seed]["eager"].get(TRAIN_TAG, {}), data[seed]["fused"].get(TRAIN_TAG, {})
        if e:
            ax1.plot(sorted(e), [e[s] for s in sorted(e)], color=c, lw=1.0,
                     label=f"eager, seed {seed}")
        if f:
            ax1.plot(sorted(f), [f[s] for s in sorted(f)], color=c, lw=1.0, ls="--",
                     label=f"fused, seed {seed}")
        for mode, mk in (("eager", "o"), ("fused", "x")):
            ev = data[seed][mode].get(EVAL_TAG, {})
            if ev:
                ax1.plot(sorted(ev), [ev[s] for s in sorted(ev)], ls="none", marker=mk,
                         color=c, ms=5, label=f"{mode} eval, seed {seed}")
        common = sorted(set(e) & set(f))
        ax2.plot(common, [f[s] - e[s] for s in common], color=c, lw=0.8, label=f"seed {seed}")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_title(f"DoRA fine-tuning, eager vs fused — run '{run}'")
    ax1.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set_ylabel("fused − eager loss (nats/token)")
    ax2.set_xlabel("optimizer step")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"training_{run}")
    paths = [base + ".pdf"]
    fig.savefig(paths[0], bbox_inches="tight", metadata={"CreationDate": None})
    if png:
        paths.append(base + ".png")
        fig.savefig(paths[1], dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=DEFAULT_RUNS,
                    help="directory of runs (default: code/convergence_runs/)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: paper/figures/)")
    ap.add_argument("--png", action="store_true", help="also write PNGs")
    args = ap.parse_args(argv)

    runs = find_runs(args.runs)
    drawn = 0
    for run, seeds in runs.items():
        data = defaultdict(dict)
        for (mode, seed), path in seeds.items():
            data[seed][mode] = read_scalars(path)
        data = {s: d for s, d in data.items()
                if TRAIN_TAG in d.get("eager", {}) and TRAIN_TAG in d.get("fused", {})}
        if not data:
            print(f"[skip] run '{run}': no seed with '{TRAIN_TAG}' in both eager and fused")
            continue
        st = loss_stats(data)
        print(f"run {run}: seeds {sorted(data)}, {st['n_pairs']} (seed, step) pairs")
        print(f"mean |dloss| per step: {st['mean_abs']:.6e}")
        print(f"max |dloss| per step: {st['max_abs']:.6e}")
        if st["eval_mean_abs"] is not None:
            print(f"final eval |dloss|: mean {st['eval_mean_abs']:.6e}, "
                  f"max {st['eval_max_abs']:.6e} over {st['n_eval_seeds']} seed(s)")
        else:
            print(f"final eval |dloss|: no '{EVAL_TAG}' in both eager and fused")
        for p in draw(run, data, args.out, args.png):
            print(f"[ok] {p}")
        drawn += 1
    if not drawn:
        print(f"[error] no convergence runs found under {args.runs} (expected "
              f"<run>/eager_seed<k>/ and <run>/fused_seed<k>/ with '{TRAIN_TAG}' scalars)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
