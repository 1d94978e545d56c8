#!/usr/bin/env python
"""GPU check of the fused DoRA kernels: correctness at production shapes, then bandwidth.

    python code/scripts/gpu_fused_check.py --out code/results/gpu_fused_check_h100.json
    python code/scripts/gpu_fused_check.py --out /tmp/quick.json --quick

Cases: T = 4096 tokens, (d_in, d_out) in {(4096, 4096), (8192, 8192), (5120, 27648),
(27648, 5120)}; the compose depends on (T, d_out) only, the norm assembly on (d_out, r) with
r in {16, 128, 384, 768}. Each kernel is first checked against its pure-PyTorch twin (a case
that fails gets no speed number), then timed with CUDA events: warm-up, median of repeats,
p20/p80 spread, inputs rotated across sets and L2 flushed before every timed call (which also
keeps the launch queue ahead of the GPU). Bytes moved count each tensor read once and written
once; achieved GB/s is reported against a device-to-device copy measured in the same run (goal
>= 85%), and against a roofline (memory at the copy bandwidth; for the norm also compute, at
matmul throughput measured in the same run). One JSON file: GPU, versions, rows per case.

Smoke test of the script itself without a GPU (interpreted kernels, tiny shapes, timings meaningless):
    TRITON_INTERPRET=1 python code/scripts/gpu_fused_check.py --out /tmp/s.json --device cpu \
        --tokens 32 --d-outs 48 --ranks 16 --repeats 2 --warmup 1 --copy-mib 1
"""

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"4096x4096": (4096, 4096), "8192x8192": (8192, 8192), "5120x27648": (5120, 27648),
          "27648x5120": (27648, 5120)}
RANKS = (16, 128, 384, 768)
BW_GOAL = 0.85


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="path of the JSON file to write")
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens per micro-batch (default 4096)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="activation dtype (default bf16)")
    p.add_argument("--ranks", type=lambda x: tuple(int(v) for v in x.split(",")), default=RANKS,
                   help="comma-separated LoRA ranks for the norm assembly (default 16,128,384,768)")
    p.add_argument("--repeats", type=int, default=50, help="timed repeats per case (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up calls per case (default 10)")
    p.add_argument("--copy-mib", type=int, default=1024, help="buffer size of the copy-bandwidth probe (MiB)")
    p.add_argument("--comprehensive", action="store_true", help="autotune over the large config space")
    p.add_argument("--quick", action="store_true", help="first shape only, ranks 16 and 384, 10 repeats")
    p.add_argument("--d-outs", type=lambda x: tuple(int(v) for v in x.split(",")), default=None,
                   help="override the d_out list (comma-separated), e.g. for a smoke test")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only for a smoke test under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    if args.quick:
        args.ranks, args.repeats, args.warmup = (16, 384), 10, 3
    return args


def _import_fused():
    import importlib
    import importlib.util

    if importlib.util.find_spec("dorafactors") is None:  # not installed: use this checkout
        sys.path.insert(0, str(REPO_ROOT / "src"))
    return importlib.import_module("dorafactors.dora_fused"), importlib.import_module("dorafactors.dora_fused_naive")


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - no git, no commit
        return None


class Timer:
    """CUDA-event timing of ``fn(i)``, with an L2 flush before every call (outside the timed span)."""

    def __init__(self, torch, device, warmup, repeats):
        self.torch, self.device, self.warmup, self.repeats = torch, device, warmup, repeats
        self.cuda = torch.device(device).type == "cuda"
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) if self.cuda else 0
        self.l2_bytes = int(l2 or (50 << 20))
        self.flush = torch.empty(2 * self.l2_bytes if self.cuda else 1, dtype=torch.int8, device=device)

    def __call__(self, fn):
        torch = self.torch
        for i in range(self.warmup):
            fn(i)
        if not self.cuda:  # smoke test only
            t = []
            for k in range(self.repeats):
                t0 = time.perf_counter()
                fn(self.warmup + k)
                t.append((time.perf_counter() - t0) * 1e3)
            t.sort()
        else:
            torch.cuda.synchronize()
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.repeats)]
            for k, (start, end) in enumerate(ev):
                self.flush.zero_()  # evicts L2; the GPU is busy with it while the next launch is queued
                start.record()
                fn(self.warmup + k)
                end.record()
            torch.cuda.synchronize()
            t = sorted(s.elapsed_time(e) for s, e in ev)
        q = lambda f: t[min(len(t) - 1, max(0, round(f * (len(t) - 1))))]  # noqa: E731
        med = q(0.5)
        return {"median_ms": med, "p20_ms": q(0.2), "p80_ms": q(0.8), "min_ms": t[0], "max_ms": t[-1],
                "spread": (q(0.8) - q(0.2)) / med if med > 0 else None, "repeats": len(t)}


def rotation(torch, bytes_per_set, l2_bytes, cap=4):
    """Input sets to cycle through so consecutive calls never find their inputs in L2."""
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 1 << 34
    want = max(2, math.ceil(3 * l2_bytes / max(bytes_per_set, 1)))
    return max(1, min(want, cap, int(0.4 * free // max(bytes_per_set, 1))))


def copy_bandwidth(torch, timer, mib):
    n = mib << 20
    src = torch.empty(n, dtype=torch.int8, device=timer.device).random_(-128, 127)
    dst = torch.empty_like(src)
    st = timer(lambda i: dst.copy_(src))
    gbps = 2 * n / (st["median_ms"] * 1e-3) / 1e9
    return {"bytes": 2 * n, **st, "gbps": gbps}


def matmul_tflops(torch, timer, dtype, tf32=False):
    n = 8192 if timer.cuda else 256
    a = torch.randn(n, n, device=timer.device).to(dtype)
    b = torch.randn(n, n, device=timer.device).to(dtype)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        st = timer(lambda i: a @ b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * n**3 / (st["median_ms"] * 1e-3) / 1e12


def _errors(torch, actual, expected):
    a, e = actual.float(), expected.float()
    nan = bool(torch.isnan(a).any())
    diff = (a - e).abs()
    rel_rms = (diff.norm() / e.norm().clamp_min(1e-30)).item()
    return {"has_nan": nan, "max_abs_err": diff.max().item(), "rel_rms_err": rel_rms}, diff, e.abs()


def _row(suite, case, params, st, nbytes, copy_gbps, flops=0.0, peak_tflops=None, extra=None):
    row = {"suite": suite, "case": case, **params, "bytes": nbytes}
    if st is None:
        row.update({"median_ms": None, "gbps": None, "fraction_of_copy_bw": None})
    else:
        gbps = nbytes / (st["median_ms"] * 1e-3) / 1e9
        mem_ms = nbytes / (copy_gbps * 1e9) * 1e3
        cmp_ms = flops / (peak_tflops * 1e12) * 1e3 if (flops and peak_tflops) else 0.0
        roof = max(mem_ms, cmp_ms)
        row.update(st)
        row.update({"gbps": gbps, "fraction_of_copy_bw": gbps / copy_gbps, "roofline_ms": roof,
                    "roofline_bound": "compute" if cmp_ms > mem_ms else "memory",
                    "fraction_of_roofline": roof / st["median_ms"], "meets_bw_goal": gbps / copy_gbps >= BW_GOAL})
    row.update(extra or {})
    return row


def _best_config(F, name):
    cfg = getattr(F._tuned(name), "best_config", None)
    return str(cfg) if cfg is not None else None


def run_compose(torch, F, N, timer, args, d_out, copy_gbps):
    T, dtype, s = args.tokens, getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[args.dtype]), 2.0
    dev = args.device
    es = torch.empty(0, dtype=dtype).element_size()
    td = T * d_out * es
    case, params = f"T{T}-dout{d_out}-{args.dtype}", {"T": T, "d_out": d_out, "dtype": args.dtype}
    n_sets = rotation(torch, 7 * td, timer.l2_bytes)
    gen = torch.Generator(device=dev).manual_seed(0)
    sets = []
    for _ in range(n_sets):
        base = torch.randn(T, d_out, device=dev, generator=gen).to(dtype)
        lora = (0.1 * torch.randn(T, d_out, device=dev, generator=gen)).to(dtype)
        dy = torch.randn(T, d_out, device=dev, generator=gen).to(dtype)
        sets.append((base, lora, dy))
    m = torch.rand(d_out, device=dev, generator=gen) + 0.5
    n = m * (1 + 0.01 * torch.randn(d_out, device=dev, generator=gen))
    g = (m / n).to(dtype)
    vec = 2 * d_out * 4  # m and n, fp32
    rows = []

    # Forward: reads base, lora; writes out (and v when m needs a gradient).
    for write_v in (False, True):
        suite = "compose_fwd_save_v" if write_v else "compose_fwd"
        base, lora, _ = sets[0]
        out, v = F._launch_compose_fwd(base, lora, m, n, s, None, write_v)
        twin = N.dora_compose_reference(base, lora, m, n, s)
        err, diff, mag = _errors(torch, out, twin)
        ok = not err["has_nan"] and bool((diff <= 2**-7 * mag + 1e-6).all())
        if write_v:
            v_ok = bool(((v.float() - (base.float() + s * lora.float())).abs()
                         <= 2**-7 * (base.float() + s * lora.float()).abs() + 1e-6).all())
            ok = ok and v_ok
        st = timer(lambda i: F._launch_compose_fwd(sets[i % n_sets][0], sets[i % n_sets][1], m, n, s, None,
                                                   write_v)) if ok else None
        nbytes = (4 if write_v else 3) * td + vec
        extra = {"correct": ok, **err, "best_config": _best_config(F, "compose_fwd") if ok else None}
        if not write_v and ok:
            # The eager two-pass compose, for scale: add(base, lora, alpha=s) then mul_(g).
            extra["eager_two_pass_ms"] = timer(
                lambda i: torch.add(sets[i % n_sets][0], sets[i % n_sets][1], alpha=s).mul_(g))["median_ms"]
        rows.append(_row(suite, case, params, st, nbytes, copy_gbps, extra=extra))
        del out, v

    # Backward: reads dy (and v or out for d_m); writes d_base, d_lora; tiny partials for d_m.
    saved_sets = [F._launch_compose_fwd(b, lo, m, n, s, None, True) for b, lo, _ in sets]
    for suite, need_dm, saved_is_out in (("compose_bwd_m_frozen", False, False), ("compose_bwd_save_v", True, False),
                                         ("compose_bwd_save_out", True, True)):
        base, lora, dy = sets[0]

        def call(i, need_dm=need_dm, saved_is_out=saved_is_out):
            k = i % n_sets
            sv = saved_sets[k][0] if saved_is_out else saved_sets[k][1]
            return F._launch_compose_bwd(sets[k][2], sv, m, n, s, saved_is_out=saved_is_out, need_dbase=True,
                                         need_dlora=True, need_dm=need_dm, need_dbias=False, lora_dtype=dtype,
                                         acc_dtype=torch.float32)

        d_base, d_lora, d_m, _ = call(0)
        r_base, r_lora, r_m = N.dora_compose_backward_reference(dy, base, lora, m, n, s)
        err, diff, mag = _errors(torch, d_base, r_base)
        ok = not err["has_nan"] and bool((diff <= 2**-7 * mag + 1e-6).all())
        ok = ok and bool(((d_lora.float() - r_lora.float()).abs() <= 2**-7 * r_lora.float().abs() + 1e-6).all())
        if need_dm:
            scale = (dy.float() * (base.float() + s * lora.float())).abs().sum(0) / n
            dm_err = ((d_m - r_m).abs() / scale.clamp_min(1e-30)).max().item()
            err["d_m_max_err_over_scale"] = dm_err
            ok = ok and dm_err <= 1e-2
        st = timer(call) if ok else None
        chunks = math.ceil(T / F._default_t_chunk(T))
        nbytes = (4 if need_dm else 3) * td + vec + (2 * chunks * d_out * 4 if need_dm else 0)
        rows.append(_row(suite, case, params, st, nbytes, copy_gbps,
                         extra={"correct": ok, **err, "best_config": _best_config(F, "compose_bwd") if ok else None}))
    return rows


def run_norm(torch, F, timer, d_out, r, factor_dtype, copy_gbps, peaks):
    dev = timer.device
    gen = torch.Generator(device=dev).manual_seed(r)
    d_in = 4096
    A = torch.randn(r, d_in, device=dev, generator=gen) / d_in**0.5
    n_sets = rotation(torch, d_out * r * 6, timer.l2_bytes)
    sets = []
    for _ in range(n_sets):
        U = (0.05 * torch.randn(d_out, r, device=dev, generator=gen)).to(torch.bfloat16)
        B = (0.02 * torch.randn(d_out, r, device=dev, generator=gen)).to(factor_dtype)
        sets.append((U, B))
    G = A @ A.T
    G = ((G + G.T) / 2).to(factor_dtype)
    base_sq = 1.0 + torch.rand(d_out, device=dev, generator=gen)
    m = torch.rand(d_out, device=dev, generator=gen) + 0.5
    s, eps = 2.0, 1e-6
    U, B = sets[0]
    n, g = F.dora_norm_assembly(base_sq, U, B, G, s, m, eps)
    Bd = B.double()
    nsq = base_sq.double() + 2 * s * (Bd * U.double()).sum(1) + s * s * ((Bd @ G.double()) * Bd).sum(1)
    n_e = nsq.clamp_min(0).sqrt().clamp_min(eps)
    rel = ((n.double() - n_e).abs() / n_e).max().item()
    ok = not bool(torch.isnan(n).any()) and rel <= 1e-5
    st = timer(lambda i: F.dora_norm_assembly(base_sq, sets[i % n_sets][0], sets[i % n_sets][1], G, s, m, eps)) \
        if ok else None
    fe = torch.empty(0, dtype=factor_dtype).element_size()
    nbytes = d_out * r * (2 + fe) + r * r * fe + 4 * d_out * 4  # U, B, G once; base_sq, m in; n, g out
    flops = d_out * r * r + 2 * d_out * r  # B·G over the upper block triangle (G symmetric) + cross term
    if factor_dtype == torch.float32:
        eff_flops, peak = 3 * flops, peaks["tf32"]  # 3xTF32
    else:
        eff_flops, peak = flops, peaks["bf16"]
    name = "fp32" if factor_dtype == torch.float32 else "bf16"
    row = _row("norm_assembly", f"dout{d_out}-r{r}-BG{name}", {"d_out": d_out, "r": r, "factor_dtype": name}, st,
               nbytes, copy_gbps, eff_flops, peak,
               extra={"correct": ok, "n_max_rel_err_vs_fp64": rel, "flops": flops,
                      "best_config": _best_config(F, "norm") if ok else None})
    if st is not None:
        row["tflops"] = flops / (st["median_ms"] * 1e-3) / 1e12
    return row


def entry_overhead(torch, F, args):
    """Host time per call of the public entry at a decode-sized shape (T=1): Python + launch cost."""
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[args.dtype])
    dev = args.device
    sync = torch.cuda.synchronize if torch.device(dev).type == "cuda" else (lambda: None)
    base = torch.randn(1, 4096, device=dev).to(dtype)
    lora = torch.randn(1, 4096, device=dev).to(dtype)
    m, n = torch.ones(4096, device=dev), torch.ones(4096, device=dev)
    out = {}
    for name, fn in (("dora_compose_no_grad_us", lambda: F.dora_compose(base, lora, m, n, 2.0)),
                     ("launcher_us", lambda: F._launch_compose_fwd(base, lora, m, n, 2.0, None, False))):
        calls = 500 if torch.device(dev).type == "cuda" else 5
        for _ in range(min(20, calls)):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        out[name] = (time.perf_counter() - t0) / calls * 1e6
    return out


def main(argv=None):
    args = parse_args(argv)
    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_fused_check: no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    F, N = _import_fused()
    if not F.is_available():
        print("gpu_fused_check: dorafactors.dora_fused.is_available() is False (Triton missing?)", file=sys.stderr)
        return 2
    if args.comprehensive:
        F.set_autotune_comprehensive(True)
    import triton

    timer = Timer(torch, args.device, args.warmup, args.repeats)
    copy = copy_bandwidth(torch, timer, args.copy_mib)
    peaks = {"bf16": matmul_tflops(torch, timer, torch.bfloat16), "tf32": matmul_tflops(torch, timer, torch.float32, True)}
    print(f"copy bandwidth {copy['gbps']:.0f} GB/s; matmul bf16 {peaks['bf16']:.0f} TFLOP/s, tf32 {peaks['tf32']:.0f}")
    shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES
    d_outs = args.d_outs or list(dict.fromkeys(d_out for _, d_out in shapes.values()))
    rows = []
    for d_out in d_outs:
        rows += run_compose(torch, F, N, timer, args, d_out, copy["gbps"])
        if timer.cuda:
            torch.cuda.empty_cache()  # the compose's [T, d_out] input sets are gone
        for r in args.ranks:
            for fdt in (torch.float32, torch.bfloat16):
                rows.append(run_norm(torch, F, timer, d_out, r, fdt, copy["gbps"], peaks))
    on_gpu = timer.cuda
    report = {
        "meta": {"gpu": torch.cuda.get_device_name(args.device) if on_gpu else f"none ({args.device} smoke test)",
                 "sm_count": torch.cuda.get_device_properties(args.device).multi_processor_count if on_gpu else None,
                 "l2_bytes": timer.l2_bytes, "torch": torch.__version__, "triton": triton.__version__,
                 "cuda": torch.version.cuda, "python": platform.python_version(), "commit": _git_commit(),
                 "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "shapes": {k: list(v) for k, v in shapes.items()}, "d_outs": list(d_outs),
                 "autotune_comprehensive": bool(args.comprehensive), "bw_goal_fraction_of_copy": BW_GOAL},
        "copy": copy,
        "matmul_tflops": peaks,
        "entry_overhead": entry_overhead(torch, F, args),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    hdr = f"{'suite':<22} {'case':<24} {'ok':<3} {'median ms':>10} {'spread':>7} {'GB/s':>7} {'of copy':>8} {'of roof':>8}"
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        med = row.get("median_ms")
        fmt = (lambda x, f: format(x, f) if x is not None else "-")  # noqa: E731
        print(f"{row['suite']:<22} {row['case']:<24} {'yes' if row['correct'] else 'NO':<3} {fmt(med, '10.4f'):>10} "
              f"{fmt(row.get('spread'), '7.2f'):>7} {fmt(row.get('gbps'), '7.0f'):>7} "
              f"{fmt(row.get('fraction_of_copy_bw'), '8.2f'):>8} {fmt(row.get('fraction_of_roofline'), '8.2f'):>8}")
    bad = [r for r in rows if not r["correct"]]
    print(f"wrote {args.out}; {len(rows)} rows, {len(bad)} failing correctness")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
