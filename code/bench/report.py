"""Progress while the run goes, and the summary table at its end (rich when importable, else text)."""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from typing import Any, Optional

__all__ = ["Progress", "summary_tables", "print_summary"]

HEADLINE = ("ours_auto", "ours_fused", "ours_eager")
# what the end-of-run table shows per suite (the JSON has everything)
SUMMARY_METRICS = {
    "norm": {"time", "peak_extra_mem"},
    "compose": {"time", "pct_of_copy_bandwidth"},
    "layer": {"time"},
    "memory": {"peak_extra_mem"},
    "stability": {"y_rel_rms", "dm_rel_rms", "dB_rel_rms"},
    "model": {"time", "peak_extra_mem", "logits_rel_rms_vs_fp32", "logits_cosine_vs_fp32"},
}


class Progress:
    """tqdm over the cases when tqdm imports and stderr is a terminal; else one line per case."""

    def __init__(self, total: int, *, enabled: bool = True) -> None:
        self.total, self.done = total, 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label[:60])
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(value: Optional[float], unit: str, metric: str = "") -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return f"{value / 2**20:.1f}MiB"
    if metric.endswith("cosine_vs_fp32"):
        return f"{value:.6f}"
    if unit == "ms":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return f"{value:.3g}"


def _shape_text(shape: dict) -> str:
    if "model" in shape:
        return f"{shape['model']} L{shape.get('layers')} r{shape.get('r')} s{shape.get('seqlen')}"
    if "d_in" in shape and "d_out" in shape:
        text = f"{shape['d_in']}x{shape['d_out']}"
        return text + "".join(f" {k}{shape[k]}" for k in ("r", "T") if k in shape)
    if "T" in shape and "d_out" in shape:
        return f"T{shape['T']} d_out{shape['d_out']}"
    return " ".join(f"{k}={v}" for k, v in shape.items())


def summary_tables(rows: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per suite: header and rows of ``case | shape | dtype | metric | one column per provider |
    headline/ref | headline/lora`` (headline: ours_auto, else ours_fused, else ours_eager)."""
    groups: "OrderedDict[tuple, dict[str, dict]]" = OrderedDict()
    providers_by_suite: dict[str, list[str]] = {}
    for row in rows:
        if row["metric"] not in SUMMARY_METRICS.get(row["suite"], ()) or row["provider"] == "all":
            continue
        key = (row["suite"], row["case"], json.dumps(row["shape"], sort_keys=True), row["dtype"], row["metric"])
        groups.setdefault(key, {})[row["provider"]] = row
        names = providers_by_suite.setdefault(row["suite"], [])
        if row["provider"] not in names and row["status"] != "skipped":
            names.append(row["provider"])
    from .providers import PROVIDER_NAMES

    order = {name: i for i, name in enumerate(PROVIDER_NAMES)}
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    for (suite, case, shape, dtype, metric), by_provider in groups.items():
        if not any(row["status"] == "ok" for row in by_provider.values()):
            continue
        names = sorted(providers_by_suite[suite], key=lambda n: order.get(n, len(order)))
        header = ["case", "shape", "dtype", "metric", *names, "ours/ref", "ours/lora"]
        line = [case, _shape_text(json.loads(shape)), dtype, metric]
        for name in names:
            row = by_provider.get(name)
            if row is None:
                line.append("")
            elif row["status"] != "ok":
                line.append(row["status"])
            else:
                line.append(_fmt(row["value"], row["unit"], row["metric"]))
        head = next((by_provider[n] for n in HEADLINE if n in by_provider and by_provider[n]["status"] == "ok"), None)
        for field in ("ratio_vs_ref", "ratio_vs_lora"):
            value = head.get(field) if head else None
            line.append(f"{value:.3f}x" if value is not None else "-")
        tables.setdefault(suite, (header, []))[1].append(line)
    return tables


def print_summary(rows: list[dict[str, Any]], stream=None) -> None:
    stream = stream or sys.stdout
    tables = summary_tables(rows)
    try:
        if not stream.isatty():  # logs (CI, the device tool's output tail) get compact plain text
            raise ImportError
        from rich.console import Console
        from rich.table import Table

        console = Console(file=stream)
        for suite, (header, lines) in tables.items():
            table = Table(title=f"{suite} (median; ours = ours_auto, else fused, else eager)", show_lines=False)
            for h in header:
                table.add_column(h, overflow="fold")
            for line in lines:
                table.add_row(*line)
            console.print(table)
        return
    except ImportError:
        pass
    for suite, (header, lines) in tables.items():
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        stream.write(f"\n== {suite} (median; ours = ours_auto, else fused, else eager) ==\n")
        stream.write("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "\n")
        for line in lines:
            stream.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + "\n")
