#!/usr/bin/env python
"""Time the fused linear backward's ``P = dyᵀ·(A·x)`` GEMM alone (GPU): bf16 output, fp32 output
(``torch.mm(..., out_dtype=torch.float32)``) and bf16 output widened afterwards.

    python code/scripts/mm_out_dtype_probe.py --out $OUT/mm_out_dtype.json

T = 4096 tokens; (d_out, r) pairs of Qwen3-VL-8B's layers at r=16 and r=384. Median µs per call
from ``torch.utils.benchmark`` (back-to-back calls: the GPU time, not the host's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

CASES = [(12288, 16), (4096, 16), (12288, 384), (4096, 384), (1024, 16)]
VARIANTS = {
    "bf16": "torch.mm(dy.t(), ax)",
    "out_fp32": "torch.mm(dy.t(), ax, out_dtype=torch.float32)",
    "bf16_then_float": "torch.mm(dy.t(), ax).float()",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("mm_out_dtype_probe needs a CUDA device")
    us = {}
    for d_out, r in CASES:
        dy = torch.randn(args.tokens, d_out, device="cuda", dtype=torch.bfloat16)
        ax = torch.randn(args.tokens, r, device="cuda", dtype=torch.bfloat16)
        for name, stmt in VARIANTS.items():
            t = Timer(stmt, globals={"torch": torch, "dy": dy, "ax": ax}).blocked_autorange(min_run_time=0.3)
            us[f"{d_out}x{r} {name}"] = t.median * 1e6
            print(f"{d_out:6d} r{r:4d} {name:16s} {t.median * 1e6:8.1f} us", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "tokens": args.tokens, "us": us}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
