"""The runner behind ``code/bench_dora_comprehensive.py``: flags, start-up checks, the plan of
cases, one loop over them, the JSON and the summary."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import torch

from . import startup
from .common import Case
from .config import RunConfig, parse_args
from .providers import Provider, make_providers
from .report import Progress, print_summary
from .results import SCHEMA_VERSION, Recorder, environment, output_path, write_json
from .timing import timer_name

__all__ = ["main", "SUITE_FUNCS"]

EXIT_OK, EXIT_ERRORS, EXIT_STARTUP = 0, 1, 3

PRECISION = ("model weights in the run dtype; PEFT's default fp32 adapter weights; torch.autocast to the run dtype "
             "(bf16/fp16) unless --no-autocast; fp32 runs without autocast, TF32 off")


def _suite_funcs() -> dict[str, tuple[Callable, Callable]]:
    from .suite_kernels import plan_compose, plan_norm, run_compose, run_norm
    from .suite_layer import plan_layer, plan_memory, plan_stability, run_layer, run_memory, run_stability
    from .suite_model import plan_model, run_model

    return {"norm": (plan_norm, run_norm), "compose": (plan_compose, run_compose), "layer": (plan_layer, run_layer),
            "memory": (plan_memory, run_memory), "stability": (plan_stability, run_stability),
            "model": (plan_model, run_model)}


SUITE_FUNCS = _suite_funcs


@dataclasses.dataclass
class Context:
    """What every suite's ``run(case, ctx)`` gets."""

    cfg: RunConfig
    device: torch.device
    providers: list[Provider]
    rec: Recorder
    reference: Optional[ModuleType]
    every: list[Provider] = dataclasses.field(default_factory=list)  # also those --providers left out
    copy_gbps: Optional[float] = None
    copy_stats: Any = None

    def reference_first(self) -> list[tuple[Provider, bool]]:
        from .providers import reference_first

        return reference_first(self.providers, self.every or self.providers)


def plan(cfg: RunConfig) -> list[Case]:
    funcs = _suite_funcs()
    return [case for suite in cfg.suites for case in funcs[suite][0](cfg)]


def _print_list(cfg: RunConfig, providers: list[Provider], cases: list[Case], problems, out=sys.stdout) -> None:
    out.write(f"device: {cfg.device}  profile: {cfg.profile}  timer: {timer_name(torch.device(cfg.device))}\n")
    if problems:
        out.write("start-up checks that would fail:\n" + "\n".join(p.render() for p in problems) + "\n")
    out.write("providers:\n")
    for p in providers:
        state = "available" if p.available else f"skipped: {p.reason}"
        out.write(f"  {p.name:15s} {p.label} [{state}]\n")
    out.write(f"cases ({len(cases)}):\n")
    for case in cases:
        out.write(f"  {case.label}\n")


def _notes(cfg: RunConfig) -> list[str]:
    notes = [
        "ratios are what we quote; absolute times only with the GPU named",
        "model suite: no optimizer in the timed region; adapter parameters change in place between accumulation "
        "windows (outside the timed region), as an optimizer step would",
        "layer suite: fwd_bwd changes adapter parameters in place before every repeat; fwd_bwd_accum does not",
        "a provider that fails its correctness check gets no speed number (status 'failed')",
    ]
    if cfg.cpu_fallback:
        notes.insert(0, "no CUDA device: ran the smoke profile on the CPU, timed with time.perf_counter; "
                        "memory is not measured; numbers say nothing about GPU performance")
    if not cfg.autocast:
        notes.append("--no-autocast: PEFT runs LoRA's matmuls in fp32; every ratio shifts (not the headline)")
    return notes


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv, cuda_available=torch.cuda.is_available())
    device = torch.device(cfg.device)
    problems, ref_info = startup.check_environment(cfg.reference)
    if not cfg.list_only and not startup.resolve_problems(problems, interactive=sys.stdin.isatty()):
        return EXIT_STARTUP
    reference, ref_reason = None, None
    if ref_info.get("sha1_ok"):
        try:
            reference = startup.load_reference_module(Path(ref_info["path"]))
        except Exception as exc:  # noqa: BLE001
            ref_reason = f"reference does not load: {type(exc).__name__}: {exc}"
    else:
        ref_reason = next((p.what for p in problems if "reference" in p.what), "reference unavailable")
    every = make_providers(device, reference=reference, reference_reason=ref_reason,
                           reference_sha1=ref_info.get("sha1_expected") or "")
    providers = [p for p in every if cfg.providers is None or p.name in cfg.providers]
    cases = plan(cfg)
    if cfg.list_only:
        _print_list(cfg, providers, cases, problems)
        return EXIT_OK
    if cfg.cpu_fallback:
        print("no CUDA device: running the smoke profile on the CPU, timed with time.perf_counter "
              "(numbers say nothing about GPU performance)", file=sys.stderr)
    if cfg.cpu_fallback:
        # tiny shapes: threads only add synchronisation, and on a shared CI machine they spin
        torch.set_num_threads(1)
    gc.collect()
    gc.freeze()  # the imports' objects never need collecting again: keeps per-case gc.collect cheap
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ctx = Context(cfg, device, providers, Recorder(), reference, every)
    env = environment(device, [str(Path(sys.argv[0]).name) if argv is sys.argv[1:] else "bench_dora_comprehensive.py",
                               *argv])
    started = _dt.datetime.now().astimezone()
    t0 = time.perf_counter()
    funcs = _suite_funcs()
    progress = Progress(len(cases))
    errors = 0
    try:
        for case in cases:
            progress.start(case.label)
            try:
                funcs[case.suite][1](case, ctx)
            except Exception as exc:  # noqa: BLE001 - one failing case must not end the run
                errors += 1
                ctx.rec.error(case, "all", f"{type(exc).__name__}: {exc}")
                progress.write(f"ERROR in {case.label}: {type(exc).__name__}: {exc}")
                if cfg.verbose:
                    progress.write(traceback.format_exc())
            progress.advance()
    finally:
        progress.close()
    ctx.rec.add_ratios()
    doc = {
        "schema_version": SCHEMA_VERSION,
        "environment": env,
        "run": {
            "started": started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "duration_s": round(time.perf_counter() - t0, 3),
            "suites": cfg.suites,
            "dtypes": cfg.dtypes,
            "profile": cfg.profile,
            "timer": timer_name(device),
            "cpu_fallback": cfg.cpu_fallback,
            "autocast": cfg.autocast,
            "precision": PRECISION,
            "tf32": False,
            "optimizer_in_timed_region": False,
            "settings": cfg.settings(),
            "reference": ref_info,
            "notes": _notes(cfg),
        },
        "providers": [p.describe() for p in providers],
        "rows": ctx.rec.rows,
    }
    path = output_path(cfg.out, env, cfg.suite_arg, "-".join(cfg.dtypes), cfg.tag)
    gc.unfreeze()  # let interpreter shutdown free them (frozen objects trip nanobind's leak report)
    write_json(path, doc)
    print_summary(ctx.rec.rows)
    print(f"wrote {path} ({len(ctx.rec.rows)} rows, {doc['run']['duration_s']:.1f} s"
          f"{', CPU smoke profile with time.perf_counter' if cfg.cpu_fallback else ''})")
    if errors:
        print(f"{errors} case(s) raised; see rows with status 'error'", file=sys.stderr)
        return EXIT_ERRORS
    return EXIT_OK
