#!/usr/bin/env python
"""A/B of the GPU-gated paths on a model's gradient window (GPU): LoRA against our DoRA with the
switches of the fused linear set per variant (``VARIANTS``): direct Triton launches, the compiled
``[d_out, r]`` tail kernel, the dtype of the ``dyᵀ·(A·x)`` GEMM, the one-kernel forward. ``onefwd``
is the library's default; ``plain`` has every switch off.

    python code/scripts/window_ab.py --model qwen3-vl-8b --ranks 16,384 --out $OUT/window_ab.json
    python code/scripts/window_ab.py --layers 6 --ranks 384 --quant nf4-dq --variants plain,onefwd --out ...

The window is the model suite's (``bench_dora_comprehensive.py --suite model``): bf16 base from the
config with random weights, PEFT's fp32 adapters, autocast, non-reentrant gradient checkpointing,
gradient accumulation, cross-entropy on the last ``--loss-tokens`` positions, adapter parameters
changed in place between windows (outside the timed region). LoRA and DoRA wrap two copies of the
base, so their windows interleave (repeat by repeat) and drift on the host hits both alike. Each
variant's gradients of one micro-batch are first compared with the plain path's (both gates off)
as a relative Frobenius distance; a deep bf16 model's backward is not bit-reproducible, so a second
plain run sets the noise floor, and a variant further than 4x that (or 1e-3) is reported, not timed.
(The one-kernel forward does not round the LoRA product to bf16, which a deep random model amplifies
past that bound: its kernel is checked against fp64 by the GPU tests; ``--time-all`` times it anyway.)
``--smoke`` runs tiny dimensions on whatever device there is (the CPU test of this script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "code"))
sys.path.insert(0, str(ROOT / "src"))

# (direct launches, compiled tail kernel, fp32-output P GEMM from this rank up: the library's rule, or
# "never" for a bf16 GEMM widened afterwards at every rank)
# ... and the forward as one kernel (lora_B's GEMM with the compose as epilogue) or as cuBLAS's GEMM
# then the compose kernel
VARIANTS = {"plain": (False, False, "lib", False), "direct": (True, False, "lib", False),
            "tail": (False, True, "lib", False), "both": (True, True, "lib", False),
            "bf16p": (True, True, "never", False), "onefwd": (True, True, "lib", True)}
_LIB_MM_MIN_N = None


def set_gates(direct: bool, tail: bool, mm_rule: str = "lib", one_kernel_forward: bool = False) -> None:
    global _LIB_MM_MIN_N
    from dorafactors import dora_fused_launch, dora_fused_linear

    if _LIB_MM_MIN_N is None:
        _LIB_MM_MIN_N = dora_fused_linear._MM_OUT_DTYPE_MIN_N
    dora_fused_launch._DIRECT_LAUNCH = direct
    dora_fused_linear._TAIL_KERNEL_ON_CUDA = tail
    dora_fused_linear._MM_OUT_DTYPE_MIN_N = _LIB_MM_MIN_N if mm_rule == "lib" else 1 << 62
    dora_fused_linear._ONE_KERNEL_FORWARD = one_kernel_forward


def build(spec, config, rank: int, dora: bool, device: torch.device, quant: str = "none"):
    from bench.common import set_adapters, trainable
    from bench.models import build_model, enable_checkpointing, quantize_targets
    from peft import LoraConfig, get_peft_model

    import dorafactors

    base = build_model(config, device=device, dtype=torch.bfloat16, seed=0)
    if quant != "none":  # QLoRA against QDoRA on a bitsandbytes base, as the model suite's --quant
        quantize_targets(base, spec.targets, quant, device)
    for p in base.parameters():
        p.requires_grad_(False)
    enable_checkpointing(base)
    base.enable_input_require_grads()
    base.config.use_cache = False
    with dorafactors.enabled(dora):
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(spec.targets),
                                                use_dora=dora))
    set_adapters(model, seed=0, rho=0.1, mag_noise=0.01)
    model.train()
    return model, trainable(model)


def main() -> int:
    from bench.common import perturb_, zero_grads
    from bench.models import MODELS, build_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3-vl-8b", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None, help="first N decoder layers (default: all)")
    p.add_argument("--ranks", default="16,384")
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--loss-tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="plain,both,onefwd")
    p.add_argument("--time-all", action="store_true",
                   help="time every variant, also one whose gradients are past the agreement bound (recorded)")
    p.add_argument("--quant", default="none", help="bitsandbytes base, as the model suite's --quant")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="tiny dimensions (a check of this script; CPU without CUDA)")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    spec = MODELS[args.model]
    config, _, reason = build_config(spec, layers=args.layers, smoke=args.smoke)
    if config is None:
        raise SystemExit(reason)
    gen = torch.Generator(device=dev).manual_seed(0)
    batches = [(torch.randint(0, config.vocab_size, (1, args.seqlen), device=dev, generator=gen),
                torch.randint(0, config.vocab_size, (1, args.loss_tokens), device=dev, generator=gen))
               for _ in range(args.grad_accum)]

    def micro(model, ids, labels):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits[:, -args.loss_tokens:]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        (loss / args.grad_accum).backward()

    def window(model):
        for ids, labels in batches:
            micro(model, ids, labels)

    report = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "args": vars(args) | {"out": str(args.out)},
              "variants": {k: {"direct_launch": d, "tail_kernel": t, "fp32_out_p_gemm": mm, "one_kernel_forward": f}
                           for k, (d, t, mm, f) in VARIANTS.items()},
              "what": "median gradient-window ms (interleaved repeats), params changed in place between windows",
              "ranks": {}}
    import triton

    report["triton"] = triton.__version__
    for rank in [int(r) for r in args.ranks.split(",")]:
        lora, lora_params = build(spec, config, rank, dora=False, device=dev, quant=args.quant)
        ours, ours_params = build(spec, config, rank, dora=True, device=dev, quant=args.quant)
        entry = {"agreement": {}, "windows_ms": {"lora": []}}
        # correctness first: one micro-batch's gradients under each variant against the plain path's, as a
        # relative Frobenius distance over all adapter gradients; a deep bf16 model's backward is not
        # bit-reproducible (SDPA's backward), so a second plain run gives the noise floor
        def grads_of(name):
            set_gates(*VARIANTS[name])
            zero_grads(ours_params)
            micro(ours, *batches[0])
            sync()
            return [q.grad.detach().float().clone() for q in ours_params]

        def distance(a, b):
            num = sum(float((x - y).square().sum()) for x, y in zip(a, b))
            den = sum(float(y.square().sum()) for y in b)
            return (num / max(den, 1e-30)) ** 0.5

        ref = grads_of("plain")
        floor = distance(grads_of("plain"), ref)
        entry["agreement"] = {"plain_vs_plain": floor}
        ok = ["plain"]
        for name in [v for v in variants if v != "plain"]:
            dist = distance(grads_of(name), ref)
            entry["agreement"][name] = dist
            if dist <= max(4 * floor, 1e-3) or args.time_all:
                ok.append(name)
            else:
                print(f"r={rank} {name}: gradients {dist:.3g} from the plain path's (floor {floor:.3g}); not timed "
                      "(--time-all times it anyway)")
        del ref
        timed = [v for v in variants if v in ok]
        for name in timed:
            entry["windows_ms"][name] = []
        zero_grads(ours_params)
        zero_grads(lora_params)
        # warm-up: one window each (autotuning, direct-launch caches)
        window(lora)
        for name in timed:
            set_gates(*VARIANTS[name])
            window(ours)
        sync()
        for rep in range(args.repeats):
            for name, model, params in [("lora", lora, lora_params)] + [(v, ours, ours_params) for v in timed]:
                if model is ours:
                    set_gates(*VARIANTS[name])
                perturb_(params)
                zero_grads(params)
                sync()
                t0 = time.perf_counter()
                window(model)
                sync()
                ms = (time.perf_counter() - t0) * 1e3
                entry["windows_ms"][name].append(ms)
                print(f"r={rank} rep {rep} {name:>6}: {ms:8.1f} ms", flush=True)
        med = {k: statistics.median(v) for k, v in entry["windows_ms"].items() if v}
        entry["median_ms"] = med
        entry["ratio_vs_lora"] = {k: v / med["lora"] for k, v in med.items()}
        report["ranks"][str(rank)] = entry
        del lora, ours, lora_params, ours_params
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    set_gates(*VARIANTS["plain"])
    print(f"\n{'rank':>5} {'variant':>8} {'median ms':>10} {'vs LoRA':>8}")
    for rank, entry in report["ranks"].items():
        for name, ms in entry["median_ms"].items():
            print(f"{rank:>5} {name:>8} {ms:10.1f} {entry['ratio_vs_lora'][name]:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
