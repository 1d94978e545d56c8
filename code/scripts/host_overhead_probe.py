#!/usr/bin/env python
"""Host (CPU) time per adapted linear: plain LoRA against our DoRA, where the GPU never waits.

    python code/scripts/host_overhead_probe.py --out $OUT/host_probe.json [--cprofile]

A stack of 7 adapted ``nn.Linear`` (width 256, 64 tokens: the GPU finishes each kernel long before
the host issues the next) trained as the model suite trains: bf16 base, PEFT's fp32 adapters,
``torch.autocast(bf16)``, non-reentrant gradient checkpointing over the stack. The time of a block
of steps (synchronised at its end only) divided by steps and linears is the host cost of one
linear's micro-batch: two forwards (the checkpoint's and its recompute) and one backward.
Providers: PEFT's LoRA, our DoRA fused (auto dispatch) and eager (``PEFT_DORA_FUSED=0``); the
best of interleaved blocks is kept. With ``--cprofile`` a profile of our fused step is added.

On a CPU-only machine it runs the same stack on the CPU with the Triton kernels' launches replaced
by no-ops (``--stub-launches``, the default there): the CPU then also does the GEMMs, so only the
differences between providers mean much.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint

ROOT = Path(__file__).resolve().parents[2]
if "dorafactors" not in sys.modules and not os.environ.get("HOST_PROBE_NO_REPO_SRC"):
    sys.path.insert(0, str(ROOT / "src"))


class Stack(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build(dora: bool, args, device: torch.device) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    import dorafactors

    torch.manual_seed(0)
    names = [str(i) for i in range(args.depth)]
    with dorafactors.enabled(True):
        model = get_peft_model(Stack(args.width, args.depth), LoraConfig(r=args.rank, target_modules=names,
                                                                          use_dora=dora))
    model.to(device=device, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # PEFT's default: fp32 adapters beside a bf16 base
    return model.train()


def count_ops(step, providers, depth: int, steps: int = 5) -> dict:
    """Top-level aten ops (not those inside another aten op) per adapted linear per micro-batch,
    from torch.profiler: deterministic, so a host-cost regression shows on any machine."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    result = {}
    for name in providers:
        for _ in range(2):
            step(name)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(name)
        ops = Counter(e.name for e in prof.events() if e.name.startswith("aten::")
                      and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
        result[name] = {"total": sum(ops.values()) / (steps * depth),
                        "by_op": {k: v / (steps * depth) for k, v in ops.most_common()}}
    return result


def stub_kernels(tail: str = "kernel") -> None:
    """Replace every fused kernel launch by a no-op (outputs still allocated): host work only.
    ``tail="twin"`` runs the fused linear's [d_out, r] backward as its PyTorch twin instead (what
    CUDA runs while its kernel is gated off) rather than as a stubbed kernel launch."""
    from dorafactors import dora_fused, dora_fused_linear

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    dora_fused._launch_tuned = lambda *a, **k: None
    dora_fused_linear._tail_kernel = lambda: _NoLaunch()
    reference = getattr(dora_fused_linear, "lora_b_tail_backward_reference", None)
    if tail == "twin" and reference is not None:
        def twin(pdm, P, B, t, bs_dtype, need_B, need_Bs):
            return reference(pdm, P, B, t.sg, t.s_over_n, t.n, bs_dtype, need_dB=need_B, need_Bs=need_Bs)

        dora_fused_linear._tail_backward = twin


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=7)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--steps", type=int, default=50, help="steps per block")
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--stub-launches", action=argparse.BooleanOptionalAction, default=None,
                   help="replace Triton launches by no-ops (default: on without CUDA)")
    p.add_argument("--label", default="", help="a name for this source tree in the JSON")
    p.add_argument("--count-ops", action="store_true", help="also count top-level aten ops per linear")
    p.add_argument("--tail", choices=("kernel", "twin"), default="kernel",
                   help="with --stub-launches: the [d_out, r] backward as a stubbed kernel or as its twin")
    p.add_argument("--one-kernel-forward", action=argparse.BooleanOptionalAction, default=None,
                   help="force the fused linear's forward as one kernel (on) or as GEMM + compose (off)")
    p.add_argument("--fast-paths", action=argparse.BooleanOptionalAction, default=None,
                   help="force the GPU-gated host paths (direct launches, compiled tail kernel) on or off "
                        "for this run (default: the library's setting)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    stub = (not cuda) if args.stub_launches is None else args.stub_launches
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from dorafactors import dora_fused
    from dorafactors.dora_env import config_override

    if stub:
        stub_kernels(args.tail)
    from dorafactors import dora_fused_launch, dora_fused_linear

    if args.one_kernel_forward is not None:
        dora_fused_linear._ONE_KERNEL_FORWARD = args.one_kernel_forward
    if args.fast_paths is not None:
        dora_fused_launch._DIRECT_LAUNCH = args.fast_paths
        dora_fused_linear._TAIL_KERNEL_ON_CUDA = args.fast_paths
    x = torch.randn(2, args.tokens // 2, args.width, device=device, dtype=torch.bfloat16)
    providers = {"lora": (build(False, args, device), {}),
                 "ours_fused": (build(True, args, device), {"fused": True}),
                 "ours_eager": (build(True, args, device), {"fused": False})}

    def step(name: str) -> None:
        model, overrides = providers[name]
        with config_override(**overrides):  # the checkpoint's recompute (in backward) must dispatch alike
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
            out.float().sum().backward()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for name in providers:
        for _ in range(10):
            step(name)
    sync()
    best = {name: float("inf") for name in providers}
    for _ in range(args.blocks):
        for name in providers:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            sync()
            per_linear = (time.perf_counter() - t0) / args.steps / args.depth * 1e6
            best[name] = min(best[name], per_linear)
    report = {
        "what": "host us per adapted linear per micro-batch (2 forwards + 1 backward, checkpointed)",
        "label": args.label,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "stub_launches": stub,
        "fast_paths": dora_fused_launch._DIRECT_LAUNCH and dora_fused_linear._TAIL_KERNEL_ON_CUDA,
        "one_kernel_forward": dora_fused_linear._ONE_KERNEL_FORWARD,
        "args": {k: str(v) for k, v in vars(args).items()},
        "us_per_linear": best,
        "ours_fused_minus_lora_us": best["ours_fused"] - best["lora"],
        "ours_fused_over_lora": best["ours_fused"] / best["lora"],
    }
    if args.count_ops:
        report["aten_ops_per_linear"] = count_ops(step, providers, args.depth)
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            step("ours_fused")
        prof.disable()
        sync()
        sio = io.StringIO()
        pstats.Stats(prof, stream=sio).sort_stats("tottime").print_stats(40)
        report["cprofile_ours_fused"] = sio.getvalue()
    print(f"{'provider':<12} {'us/linear':>10}")
    for name, us in best.items():
        print(f"{name:<12} {us:>10.1f}")
    if args.count_ops:
        per_linear = report["aten_ops_per_linear"]
        print("aten ops per linear: " + ", ".join(f"{k} {v['total']:.1f}" for k, v in per_linear.items()))
    print(f"ours_fused - lora: {report['ours_fused_minus_lora_us']:.1f} us "
          f"({report['ours_fused_over_lora']:.2f}x)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
