#!/usr/bin/env python
"""Find host-device synchronisations in one adapted linear's step (GPU).

    python code/scripts/sync_probe.py --out $OUT/sync_probe.json

A step that waits for the GPU serialises host and device: on a host-bound window its time becomes
host time *plus* GPU time instead of the larger of the two, and nothing in a kernel profile shows
it. Here the GPU is first given a long sleep kernel (``torch.cuda._sleep``, about ``--sleep-ms``),
then one phase of a step is issued: a phase that returns on the host long before the sleep ends
never waited; one whose host time reaches the sleep blocked somewhere. For a blocked phase the
torch profiler's event with the longest own CPU time names the operation that waited.

Cases: one ``nn.Linear`` 4096 -> 4096 (bf16 base, PEFT's fp32 adapters, autocast) with PEFT's
LoRA and with dorafactors' DoRA at r = 16 and 384, optionally on a bitsandbytes NF4 base; single
ops of the fused backward (``torch.mm`` with and without ``out_dtype``); and each case under
non-reentrant gradient checkpointing (the recompute runs inside backward).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "code"))


def sleep_cycles_per_ms() -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    torch.cuda.synchronize()
    return 50_000_000 / start.elapsed_time(end)


def host_ms_behind_sleep(fn, cycles: int, prepare=None) -> float:
    """Host time of ``fn()`` issued while the GPU sleeps (the sleep is queued first; ``prepare``
    runs and finishes before it)."""
    if prepare is not None:
        prepare()
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    fn()
    host = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    return host


def blocking_op(fn, cycles: int, prepare=None) -> list:
    """The profiler's events with the longest own CPU time while ``fn`` runs behind a sleep."""
    from torch.profiler import ProfilerActivity, profile

    if prepare is not None:
        prepare()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.cuda._sleep(cycles)
        fn()
    torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
    return [(e.key, round(e.self_cpu_time_total / 1e3, 2), e.count) for e in rows]


def build_layer(kind: str, rank: int, quant: str):
    from peft import LoraConfig, get_peft_model

    import dorafactors

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False)).to("cuda", torch.bfloat16)
    if quant != "none":
        from bench import models

        models.quantize_targets(base, ("0",), quant, torch.device("cuda"))
    with dorafactors.enabled(kind == "ours"):
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"],
                                                use_dora=kind != "lora"))
    return model.train()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--sleep-ms", type=float, default=50.0)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--quant", default="none,nf4-dq", help="comma list: none and/or a bench --quant name")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sync_probe needs a CUDA device")
    cycles = int(sleep_cycles_per_ms() * args.sleep_ms)
    threshold = 0.5 * args.sleep_ms
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "sleep_ms": args.sleep_ms,
              "blocked_if_host_ms_over": threshold, "cases": {}}

    def record(name, fn, prepare=None):
        for _ in range(3):
            if prepare is not None:
                prepare()
            fn()
        torch.cuda.synchronize()
        host = min(host_ms_behind_sleep(fn, cycles, prepare) for _ in range(3))
        entry = {"host_ms": round(host, 3), "blocked": host > threshold}
        if entry["blocked"]:
            entry["longest_own_cpu"] = blocking_op(fn, cycles, prepare)
        report["cases"][name] = entry
        print(f"{name:<48} host {host:8.2f} ms {'BLOCKED ' + str(entry.get('longest_own_cpu', '')[:2]) if entry['blocked'] else ''}",
              flush=True)

    dy = torch.randn(args.tokens, 4096, device="cuda", dtype=torch.bfloat16)
    for r in (16, 384):
        ax = torch.randn(args.tokens, r, device="cuda", dtype=torch.bfloat16)
        record(f"mm bf16 [4096,T]x[T,{r}]", lambda ax=ax: torch.mm(dy.t(), ax))
        record(f"mm out_dtype=fp32 [4096,T]x[T,{r}]", lambda ax=ax: torch.mm(dy.t(), ax, out_dtype=torch.float32))
    for quant in args.quant.split(","):
        for kind in ("lora", "ours"):
            for rank in (16, 384):
                model = build_layer(kind, rank, quant)
                x = torch.randn(1, args.tokens, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                state = {}

                def forward(model=model, x=x, state=state):
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        state["y"] = model(x)

                def backward(state=state):
                    state["y"].float().square().mean().backward()

                def step_ckpt(model=model, x=x):
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
                    y.float().square().mean().backward()

                tag = f"{kind} r{rank}" + ("" if quant == "none" else f" {quant}")
                record(f"{tag} forward", forward)
                record(f"{tag} backward", backward, prepare=forward)
                record(f"{tag} step, checkpointed", step_ckpt)
                del model
                torch.cuda.empty_cache()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
