#!/usr/bin/env python
"""Profile one gradient-accumulation window of a model (GPU): where DoRA's time goes vs LoRA.

    python code/scripts/profile_model_window.py --model qwen3-vl-8b --layers 4 --rank 16 --out DIR
    python code/scripts/profile_model_window.py --layers 6 --rank 384 --quant nf4-dq --providers lora,ours --out DIR

Builds the model from its config (random weights), adapts every decoder linear, runs one warm-up
window and one profiled window (GA micro-batches, gradient checkpointing, loss on the last tokens,
adapter parameters changed in place before the window as an optimizer step would), for plain LoRA
and for dorafactors (auto dispatch), and prints/writes the top CUDA kernels of each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "code"))
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    from bench import models
    from bench.config import QUANT_NAMES
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile

    import dorafactors
    from dorafactors import dora as dora_module

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="qwen3-vl-8b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cprofile", action="store_true", help="also print a cProfile of one window")
    p.add_argument("--providers", default="lora,ours,ours_eager")
    p.add_argument("--quant", default="none", choices=QUANT_NAMES,
                   help="bitsandbytes base for the adapted linears (QLoRA / QDoRA), as the bench's --quant")
    args = p.parse_args()
    spec = models.MODELS[args.model]
    config, _, reason = models.build_config(spec, layers=args.layers)
    if config is None:
        raise SystemExit(reason)
    base = models.build_model(config, device=torch.device("cuda"), dtype=torch.bfloat16, seed=0)
    if args.quant != "none":
        models.quantize_targets(base, spec.targets, args.quant, torch.device("cuda"))
        torch.cuda.empty_cache()
    for prm in base.parameters():
        prm.requires_grad_(False)
    base.gradient_checkpointing_enable()
    base.config.use_cache = False
    targets = list(spec.targets)
    ids = [torch.randint(0, config.vocab_size, (1, args.seqlen), device="cuda") for _ in range(args.grad_accum)]
    report = {}
    norm_calls = [0]
    factored_row_norm = dora_module.factored_row_norm

    def counted_row_norm(*a, **k):  # how often the norm is recomputed: once per adapted linear per window
        norm_calls[0] += 1
        return factored_row_norm(*a, **k)

    dora_module.factored_row_norm = counted_row_norm
    for name in args.providers.split(","):
        with dorafactors.enabled(name != "lora"):
            model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets,
                                                    use_dora=name != "lora"))
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]

        def window():
            with torch.no_grad():
                for q in params:
                    q.add_(1e-4 * torch.randn_like(q))
            for x in ids:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(input_ids=x).logits[:, -1024:]
                logits.float().logsumexp(-1).mean().backward()

        override = dorafactors.config_override(fused=False) if name == "ours_eager" else contextlib.nullcontext()
        override.__enter__()
        window()
        torch.cuda.synchronize()
        windows, hosts = [], []
        for _ in range(args.repeats):  # host time to issue a window vs its device time: host-bound when close
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            window()
            end.record()
            hosts.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
            windows.append(start.elapsed_time(end))
        cprofile_text = None
        if args.cprofile:  # Python-level: which of our functions (and Triton's) take the host time
            import cProfile
            import io
            import pstats

            cp = cProfile.Profile()
            cp.enable()
            window()
            torch.cuda.synchronize()
            cp.disable()
            sio = io.StringIO()
            pstats.Stats(cp, stream=sio).sort_stats("tottime").print_stats(40)
            print(f"== {name}: cProfile by own time ==\n{sio.getvalue()[:9000]}")
            own_text = sio.getvalue()
            sio = io.StringIO()
            pstats.Stats(cp, stream=sio).sort_stats("cumtime").print_stats(45)
            print(f"== {name}: cProfile by cumulative time ==\n{sio.getvalue()[:9000]}")
            cprofile_text = own_text + sio.getvalue()
        norm_calls[0] = 0
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            window()
            torch.cuda.synchronize()
        norm_recomputes = norm_calls[0]
        override.__exit__(None, None, None)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
        cpu_table = prof.key_averages(group_by_stack_n=0).table(sort_by="self_cpu_time_total", row_limit=25)
        busy_us = sum(e.self_device_time_total for e in prof.key_averages())
        print(f"== {name}: windows {[round(w, 1) for w in windows]} ms, host issue {[round(h, 1) for h in hosts]} ms, "
              f"kernels {busy_us / 1e3:.1f} ms, norm recomputes {norm_recomputes} ==\n{table}\n{cpu_table}")
        report[name] = {"window_ms": sorted(windows)[len(windows) // 2], "windows_ms": windows, "host_issue_ms": hosts,
                        "kernel_busy_ms": busy_us / 1e3, "norm_recomputes_per_window": norm_recomputes,
                        "cuda_table": table, "cpu_table": cpu_table, "cprofile": cprofile_text}
        model.unload()
        del model
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.quant == "none" else f"_{args.quant}"
    (args.out / f"profile_{args.model}_L{args.layers}_r{args.rank}{suffix}.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "args": vars(args) | {"out": str(args.out)}, **report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
