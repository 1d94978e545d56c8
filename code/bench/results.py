"""Result rows, the environment block, the JSON writer and its schema check (see code/results/SCHEMA.md)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch

from .common import Case
from .startup import REPO_ROOT

__all__ = ["SCHEMA_VERSION", "Recorder", "environment", "output_path", "validate", "write_json"]

SCHEMA_VERSION = 1
STATUSES = ("ok", "skipped", "failed", "error")
SUITES = ("norm", "compose", "layer", "memory", "stability", "model")
RATIO_UNITS = ("ms", "bytes")


def _ratio_metric(metric: str, unit: str) -> bool:
    return unit in RATIO_UNITS or metric.endswith("rel_rms")


class Recorder:
    """Collects one row per (suite, case, shape, dtype, provider, metric)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, case: Case, provider: str, metric: str, value: Optional[float], unit: str, *,
            spread: Optional[dict] = None, status: str = "ok", note: Optional[str] = None,
            shape: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
        if status not in STATUSES:
            raise ValueError(f"status={status!r}; accepted: {STATUSES}")
        if value is not None:
            value = float(value)
            if not math.isfinite(value):  # JSON has no inf/nan: keep the row, say so
                note = f"{note + '; ' if note else ''}non-finite value {value}"
                value = None
                status = "failed" if status == "ok" else status
        row = {
            "suite": case.suite,
            "case": case.name,
            "shape": dict(shape if shape is not None else case.params),
            "dtype": case.dtype,
            "provider": provider,
            "metric": metric,
            "value": value,
            "unit": unit,
            "spread": spread,
            "status": status,
            "note": note,
        }
        if extra:
            row["extra"] = extra
        self.rows.append(row)
        return row

    def skip(self, case: Case, provider: str, metric: str, unit: str, reason: str, **kw) -> dict:
        return self.add(case, provider, metric, None, unit, status="skipped", note=reason, **kw)

    def fail(self, case: Case, provider: str, metric: str, unit: str, reason: str, **kw) -> dict:
        return self.add(case, provider, metric, None, unit, status="failed", note=reason, **kw)

    def error(self, case: Case, provider: str, reason: str) -> dict:
        return self.add(case, provider, "exception", None, "", status="error", note=reason)

    def add_ratios(self) -> None:
        """``ratio_vs_ref`` and ``ratio_vs_lora`` on every cost or error row whose group has them."""
        groups: dict[tuple, dict[str, float]] = defaultdict(dict)
        key = lambda r: (r["suite"], r["case"], json.dumps(r["shape"], sort_keys=True), r["dtype"], r["metric"])  # noqa: E731
        for row in self.rows:
            if row["status"] == "ok" and row["value"] is not None and _ratio_metric(row["metric"], row["unit"]):
                groups[key(row)][row["provider"]] = row["value"]
        for row in self.rows:
            if row["status"] != "ok" or row["value"] is None or not _ratio_metric(row["metric"], row["unit"]):
                continue
            group = groups[key(row)]
            for other, field in (("peft_ref", "ratio_vs_ref"), ("lora", "ratio_vs_lora")):
                base = group.get(other)
                row[field] = row["value"] / base if base not in (None, 0.0) else None


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", None))
    except Exception:  # noqa: BLE001
        return None


def _dist_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except Exception:  # noqa: BLE001
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device, argv: list[str]) -> dict[str, Any]:
    """GPU, compute capability, driver, library versions, command line and git commit."""
    env: dict[str, Any] = {
        "device": device.type,
        "gpu": None,
        "compute_capability": None,
        "gpu_memory_bytes": None,
        "l2_cache_bytes": None,
        "driver": None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "dorafactors": _version("dorafactors"),
        # optional kernels that change what a model run measures: QLoRA's base, Gated-DeltaNet's layers
        # (read from the installed metadata: importing them here would run their CUDA setup)
        "bitsandbytes": _dist_version("bitsandbytes"),
        "flash_linear_attention": _dist_version("flash-linear-attention"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "command_line": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *argv]),
        # BENCH_GIT_COMMIT names the commit where the tree is a copy (the device tool's copy may carry a stale .git)
        "git_commit": os.environ.get("BENCH_GIT_COMMIT") or _git("rev-parse", "HEAD") or None,
        "git_dirty": None,
    }
    status = _git("status", "--porcelain", "--untracked-files=no")
    env["git_dirty"] = None if status is None else bool(status)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_bytes=int(props.total_memory),
            l2_cache_bytes=int(getattr(props, "L2_cache_size", 0) or 0) or None,
            driver=_driver(),
        )
    return env


def device_slug(env: dict[str, Any]) -> str:
    if env.get("device") != "cuda" or not env.get("gpu"):
        return "cpu"
    name = re.sub(r"^nvidia\s+", "", env["gpu"].strip().lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def output_path(out_dir: Path, env: dict[str, Any], suite: str, dtype: str, tag: Optional[str],
                when: Optional[_dt.datetime] = None) -> Path:
    """``{gpu-or-cpu}_{suite}_{dtype}_{YYYYmmdd-HHMMSS}[_{tag}].json`` in ``out_dir``, never overwriting."""
    stamp = (when or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    stem = f"{device_slug(env)}_{suite}_{dtype}_{stamp}" + (f"_{tag}" if tag else "")
    path = out_dir / f"{stem}.json"
    k = 2
    while path.exists():
        path = out_dir / f"{stem}-{k}.json"
        k += 1
    return path


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------

_NUM = (int, float)
_ENV_FIELDS: dict[str, tuple] = {
    "device": (str,), "gpu": (str, type(None)), "compute_capability": (str, type(None)),
    "driver": (str, type(None)), "cuda": (str, type(None)), "torch": (str,), "triton": (str, type(None)),
    "peft": (str, type(None)), "transformers": (str, type(None)), "command_line": (str,),
    "git_commit": (str, type(None)),
}
_RUN_FIELDS: dict[str, tuple] = {
    "started": (str,), "finished": (str,), "duration_s": _NUM, "suites": (list,), "dtypes": (list,),
    "profile": (str,), "timer": (str,), "cpu_fallback": (bool,), "autocast": (bool,), "settings": (dict,),
    "reference": (dict,), "notes": (list,),
}
_ROW_FIELDS: dict[str, tuple] = {
    "suite": (str,), "case": (str,), "shape": (dict,), "dtype": (str,), "provider": (str,), "metric": (str,),
    "value": (int, float, type(None)), "unit": (str,), "spread": (dict, type(None)), "status": (str,),
    "note": (str, type(None)),
}
_SPREAD_FIELDS = ("iqr", "q25", "q75", "min", "max", "n")


def _check_fields(obj: Any, fields: dict[str, tuple], where: str, errors: list[str]) -> None:
    if not isinstance(obj, dict):
        errors.append(f"{where}: expected an object, got {type(obj).__name__}")
        return
    for name, types in fields.items():
        if name not in obj:
            errors.append(f"{where}: missing field '{name}'")
        elif not isinstance(obj[name], types) or (bool not in types and isinstance(obj[name], bool)):
            errors.append(f"{where}.{name}: {obj[name]!r} is not of type {'/'.join(t.__name__ for t in types)}")


def validate(doc: Any) -> list[str]:
    """Errors of ``doc`` against the schema of SCHEMA.md (an empty list when it conforms)."""
    errors: list[str] = []
    if not isinstance(doc, dict):
        return [f"document: expected an object, got {type(doc).__name__}"]
    if doc.get("schema_version") != SCHEMA_VERSION:
        errors.append(f"schema_version: {doc.get('schema_version')!r} != {SCHEMA_VERSION}")
    _check_fields(doc.get("environment"), _ENV_FIELDS, "environment", errors)
    _check_fields(doc.get("run"), _RUN_FIELDS, "run", errors)
    run = doc.get("run") if isinstance(doc.get("run"), dict) else {}
    if run.get("timer") not in ("cuda_events", "time.perf_counter"):
        errors.append(f"run.timer: {run.get('timer')!r} is not 'cuda_events' or 'time.perf_counter'")
    if run.get("profile") not in ("full", "smoke"):
        errors.append(f"run.profile: {run.get('profile')!r} is not 'full' or 'smoke'")
    providers = doc.get("providers")
    if not isinstance(providers, list):
        errors.append("providers: expected a list")
    else:
        for i, p in enumerate(providers):
            _check_fields(p, {"name": (str,), "label": (str,), "kind": (str,), "available": (bool,),
                              "reason": (str, type(None))}, f"providers[{i}]", errors)
    rows = doc.get("rows")
    if not isinstance(rows, list):
        return errors + ["rows: expected a list"]
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        _check_fields(row, _ROW_FIELDS, where, errors)
        if not isinstance(row, dict):
            continue
        if row.get("suite") not in SUITES:
            errors.append(f"{where}.suite: {row.get('suite')!r} not in {SUITES}")
        if row.get("status") not in STATUSES:
            errors.append(f"{where}.status: {row.get('status')!r} not in {STATUSES}")
        value = row.get("value")
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{where}.value: non-finite {value}")
        if row.get("status") == "ok" and value is None and not row.get("note"):
            errors.append(f"{where}: status 'ok' with a null value needs a note saying why")
        if row.get("status") in ("skipped", "failed", "error") and not row.get("note"):
            errors.append(f"{where}: status {row.get('status')!r} needs a note with the reason")
        shape = row.get("shape")
        if isinstance(shape, dict):
            for k, v in shape.items():
                if not isinstance(v, (int, float, str, bool, type(None))):
                    errors.append(f"{where}.shape.{k}: {v!r} is not a scalar")
        spread = row.get("spread")
        if isinstance(spread, dict):
            for k in _SPREAD_FIELDS:
                if not isinstance(spread.get(k), _NUM) or isinstance(spread.get(k), bool):
                    errors.append(f"{where}.spread.{k}: {spread.get(k)!r} is not a number")
        for k in ("ratio_vs_ref", "ratio_vs_lora"):
            if k in row and not isinstance(row[k], (int, float, type(None))):
                errors.append(f"{where}.{k}: {row[k]!r} is not a number or null")
    return errors


def write_json(path: Path, doc: dict[str, Any]) -> None:
    errors = validate(doc)
    if errors:
        raise ValueError("result document does not conform to SCHEMA.md:\n  " + "\n  ".join(errors[:20]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
