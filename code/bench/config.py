"""Command-line flags, their validation, and the named registries they draw from (shapes, profiles).

Every flag that takes a value defaults to ``None`` so the chosen profile (``full`` on a GPU,
``smoke`` with ``--smoke`` or on a machine without CUDA) fills it in, and an explicit flag wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Optional

from .startup import CODE_DIR

__all__ = ["SUITES", "GROUPS", "QUANT_NAMES", "SHAPES", "SMOKE_SHAPES", "PROFILES", "RunConfig", "build_parser", "parse_args"]

SUITES = ("norm", "compose", "layer", "memory", "stability", "model")
GROUPS = {"micro": ("norm", "compose", "layer", "memory", "stability"), "model": ("model",), "all": SUITES}
DTYPE_NAMES = ("bf16", "fp16", "fp32")
# base-weight quantization of the model suite (bitsandbytes): none, 4-bit NF4/FP4 (-dq: double
# quantization of the block scales, QLoRA's setting), LLM.int8()
QUANT_NAMES = ("none", "nf4", "nf4-dq", "fp4", "int8")
MAX_RANK = 4096

# (d_in, d_out) of one adapted linear layer; every list has a ragged row
SHAPES: dict[str, tuple[int, int]] = {
    "4096x4096": (4096, 4096),
    "8192x8192": (8192, 8192),
    "5120x27648": (5120, 27648),
    "27648x5120": (27648, 5120),
    "ragged": (4097, 3003),
}
SMOKE_SHAPES: dict[str, tuple[int, int]] = {"64x96": (64, 96), "96x64": (96, 64), "ragged": (67, 45)}

PROFILES: dict[str, dict] = {
    "full": dict(shapes=list(SHAPES), ranks=None, seqlen=4096, batch=1, grad_accum=8, loss_tokens=1024,
                 repeats=None, warmup=None, fidelity_layers=2),
    "smoke": dict(shapes=list(SMOKE_SHAPES), ranks=[4, 16], seqlen=64, batch=1, grad_accum=2, loss_tokens=16,
                  repeats=3, warmup=1, fidelity_layers=2),
}
# per-suite defaults of the full profile where the flag is not given
SUITE_RANKS = {"norm": [16, 128, 384, 768], "compose": [16], "layer": [16, 128, 384, 768],
               "memory": [16, 128, 384, 768], "stability": [16, 384], "model": [384]}
SUITE_REPEATS = {"model": (3, 1)}  # (repeats, warmup); micro suites use DEFAULT_REPEATS
DEFAULT_REPEATS = (20, 5)


@dataclasses.dataclass
class RunConfig:
    suites: list[str]
    suite_arg: str
    dtypes: list[str]
    ranks: Optional[list[int]]
    shapes: dict[str, tuple[int, int]]
    models: list[str]
    layers: Optional[int]
    seqlen: int
    batch: int
    grad_accum: int
    loss_tokens: int
    gradient_checkpointing: bool
    repeats: Optional[int]
    warmup: Optional[int]
    out: Path
    verbose: bool
    list_only: bool
    smoke: bool
    profile: str
    cpu_fallback: bool
    autocast: bool
    providers: Optional[list[str]]
    device: str
    tag: Optional[str]
    reference: Optional[Path]
    fidelity_layers: int
    seed: int
    quant: str = "none"

    @property
    def tokens(self) -> int:
        """T of the micro suites: batch × sequence length."""
        return self.batch * self.seqlen

    def ranks_for(self, suite: str) -> list[int]:
        if self.ranks is not None:
            return list(self.ranks)
        if self.profile == "smoke":
            return [8] if suite == "model" else list(PROFILES["smoke"]["ranks"])
        return list(SUITE_RANKS[suite])

    def timing_for(self, suite: str) -> tuple[int, int]:
        """(repeats, warmup) for ``suite``."""
        rep, warm = SUITE_REPEATS.get(suite, DEFAULT_REPEATS)
        if self.profile == "smoke":
            rep, warm = PROFILES["smoke"]["repeats"], PROFILES["smoke"]["warmup"]
        return (self.repeats if self.repeats is not None else rep, self.warmup if self.warmup is not None else warm)

    def settings(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["reference"] = str(self.reference) if self.reference else None
        d["shapes"] = {k: list(v) for k, v in self.shapes.items()}
        return d


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # same exit code as argparse (2), with the usage first
        self.print_usage()
        self.exit(2, f"{self.prog}: error: {message}\n")


def _csv(kind: str, convert):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        return [convert(t) for t in items]

    return parse


def _int_in(lo: int, hi: Optional[int] = None, what: str = "value"):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{what} {value} must be {bound}")
        return value

    return parse


def _choice(options, what: str):
    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose from {', '.join(options)}")
        return text

    return parse


def _shape(text: str) -> tuple[str, tuple[int, int]]:
    if text in SHAPES:
        return text, SHAPES[text]
    if text in SMOKE_SHAPES:
        return text, SMOKE_SHAPES[text]
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} is neither a registered name ({', '.join(list(SHAPES) + list(SMOKE_SHAPES))}) "
            f"nor D_INxD_OUT with positive integers, e.g. 4096x11008")
    return text, (int(m.group(1)), int(m.group(2)))


def build_parser() -> argparse.ArgumentParser:
    from .models import MODEL_NAMES
    from .providers import PROVIDER_NAMES

    p = _Parser(
        prog="bench_dora_comprehensive.py",
        description="Benchmark DoRA providers side by side (DESIGN.md, 'Benchmarks: how we measure').",
        epilog="Suites: " + ", ".join(SUITES) + "; groups: micro = " + ",".join(GROUPS["micro"])
        + ", model, all. Results: code/results/SCHEMA.md.",
    )
    suite_names = list(SUITES) + ["micro", "all"]
    p.add_argument("--suite", type=_csv("suite", _choice(suite_names, "suite")), default=["all"],
                   help="comma list of suites or groups (micro, model, all); default all")
    p.add_argument("--dtype", type=_csv("dtype", _choice(DTYPE_NAMES, "dtype")), default=["bf16"],
                   help="comma list of bf16, fp16, fp32 (model dtype); default bf16")
    p.add_argument("--ranks", type=_csv("rank", _int_in(1, MAX_RANK, "rank")), default=None,
                   help="comma list of LoRA ranks (default per suite: 16,128,384,768; model 384)")
    p.add_argument("--shapes", type=_csv("shape", _shape), default=None,
                   help="comma list of shape names or D_INxD_OUT (default: " + ",".join(SHAPES) + ")")
    p.add_argument("--models", type=_csv("model", _choice(list(MODEL_NAMES) + ["all"], "model")), default=None,
                   help="comma list of " + ", ".join(MODEL_NAMES) + " or all (default all)")
    p.add_argument("--layers", type=_int_in(1, what="--layers"), default=None,
                   help="keep the first N decoder layers (default: full depth)")
    p.add_argument("--seqlen", type=_int_in(8, what="--seqlen"), default=None, help="sequence length (4096)")
    p.add_argument("--batch", type=_int_in(1, what="--batch"), default=None, help="micro-batch size (1)")
    p.add_argument("--grad-accum", type=_int_in(1, what="--grad-accum"), default=None,
                   help="micro-batches per accumulation window (8)")
    p.add_argument("--loss-tokens", type=_int_in(1, what="--loss-tokens"), default=None,
                   help="loss on the last N tokens of each sequence (1024)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing in the model suite (default on)")
    p.add_argument("--repeats", type=_int_in(1, what="--repeats"), default=None,
                   help="timed repeats (default 20; model suite 3)")
    p.add_argument("--warmup", type=_int_in(0, what="--warmup"), default=None,
                   help="untimed warm-up runs (default 5; model suite 1)")
    p.add_argument("--out", type=Path, default=None, help="directory for the JSON (default code/results/)")
    p.add_argument("--verbose", action="store_true", help="more output, tracebacks of failing cases")
    p.add_argument("--list", dest="list_only", action="store_true", help="print what would run, run nothing")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and models (what CI and the CPU run)")
    p.add_argument("--no-autocast", dest="autocast", action="store_false",
                   help="no torch.autocast: PEFT then runs LoRA's matmuls in fp32 (never the headline)")
    p.add_argument("--providers", type=_csv("provider", _choice(PROVIDER_NAMES, "provider")), default=None,
                   help="comma list of " + ", ".join(PROVIDER_NAMES) + " (default all)")
    p.add_argument("--device", type=_choice(("auto", "cuda", "cpu"), "device"), default="auto",
                   help="auto (CUDA when present), cuda or cpu")
    p.add_argument("--tag", type=str, default=None, help="label appended to the JSON file name ([A-Za-z0-9._-])")
    p.add_argument("--reference", type=Path, default=None,
                   help="path of the upstream reference file (default vendor/reference/peft_0_18_0_dora.py)")
    p.add_argument("--fidelity-layers", type=_int_in(0, what="--fidelity-layers"), default=None,
                   help="decoder layers of the model suite's fidelity model (default 2; 0 skips fidelity)")
    p.add_argument("--seed", type=_int_in(0, what="--seed"), default=0, help="seed of weights and inputs")
    p.add_argument("--quant", type=_choice(QUANT_NAMES, "--quant"), default="none",
                   help="model suite: quantize every adapted linear with bitsandbytes (" + ", ".join(QUANT_NAMES)
                   + "; default none); LoRA is then QLoRA, DoRA QDoRA")
    return p


def expand_suites(tokens: list[str]) -> list[str]:
    chosen = set()
    for t in tokens:
        chosen.update(GROUPS.get(t, (t,)))
    return [s for s in SUITES if s in chosen]


def parse_args(argv: Optional[list[str]], *, cuda_available: bool) -> RunConfig:
    """Parse and validate ``argv``; exits 2 with a message naming the bad value."""
    from .models import MODEL_NAMES

    parser = build_parser()
    a = parser.parse_args(argv)
    if a.device == "cuda" and not cuda_available:
        parser.error("--device cuda: no CUDA device is available")
    device = "cuda" if (a.device == "cuda" or (a.device == "auto" and cuda_available)) else "cpu"
    cpu_fallback = device == "cpu"
    profile = "smoke" if (a.smoke or cpu_fallback) else "full"
    prof = PROFILES[profile]
    if a.tag is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", a.tag):
        parser.error(f"--tag {a.tag!r}: use 1 to 64 characters of A-Z a-z 0-9 . _ -")
    shapes = dict(a.shapes) if a.shapes else {
        k: (SMOKE_SHAPES if profile == "smoke" else SHAPES)[k] for k in prof["shapes"]}
    seqlen = a.seqlen if a.seqlen is not None else prof["seqlen"]
    loss_tokens = a.loss_tokens if a.loss_tokens is not None else min(prof["loss_tokens"], seqlen)
    if loss_tokens > seqlen:
        parser.error(f"--loss-tokens {loss_tokens} exceeds --seqlen {seqlen}")
    models = a.models or ["all"]
    models = list(MODEL_NAMES) if "all" in models else list(dict.fromkeys(models))
    if a.providers is not None and not a.providers:
        parser.error("--providers: empty list")
    out = a.out if a.out is not None else CODE_DIR / "results"
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: exists and is not a directory")
    if a.quant != "none":
        if set(expand_suites(a.suite)) != {"model"}:
            parser.error(f"--quant {a.quant} applies to the model suite only; use --suite model")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            parser.error(f"--quant {a.quant} needs bitsandbytes: pip install bitsandbytes (see requirements.txt)")
    return RunConfig(
        suites=expand_suites(a.suite),
        suite_arg="-".join(a.suite),
        dtypes=list(dict.fromkeys(a.dtype)),
        ranks=list(dict.fromkeys(a.ranks)) if a.ranks else None,
        shapes=shapes,
        models=models,
        layers=a.layers,
        seqlen=seqlen,
        batch=a.batch if a.batch is not None else prof["batch"],
        grad_accum=a.grad_accum if a.grad_accum is not None else prof["grad_accum"],
        loss_tokens=loss_tokens,
        gradient_checkpointing=a.gradient_checkpointing,
        repeats=a.repeats,
        warmup=a.warmup,
        out=out.resolve(),
        verbose=a.verbose,
        list_only=a.list_only,
        smoke=a.smoke,
        profile=profile,
        cpu_fallback=cpu_fallback,
        autocast=a.autocast,
        providers=list(dict.fromkeys(a.providers)) if a.providers else None,
        device=device,
        tag=a.tag,
        reference=a.reference.resolve() if a.reference else None,
        fidelity_layers=a.fidelity_layers if a.fidelity_layers is not None else prof["fidelity_layers"],
        seed=a.seed,
        quant=a.quant,
    )
