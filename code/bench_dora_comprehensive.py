#!/usr/bin/env python
"""Benchmark DoRA side by side: upstream PEFT (reference), ours eager / fused / auto, LoRA, base.

    python code/bench_dora_comprehensive.py --suite all            # everything (smoke profile on CPU)
    python code/bench_dora_comprehensive.py --suite micro --dtype bf16
    python code/bench_dora_comprehensive.py --suite model --models qwen3-vl-8b --ranks 384
    python code/bench_dora_comprehensive.py --list                 # what would run

Works from any directory; writes one JSON per run under code/results/ (schema: code/results/SCHEMA.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
