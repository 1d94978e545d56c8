#!/usr/bin/env python
"""Where the fused compose's host time goes, and what the kernels alone take (GPU diagnostic).

    python code/scripts/launch_overhead_probe.py --out $OUT/launch_probe.json

1. Host cost per call (µs, no synchronisation, tiny T so the GPU never holds the CPU back) of:
   the autotuned launch, a launch of the raw kernel with the chosen config, a direct launch of
   the compiled kernel, our launcher, the autograd entry, and the layer's fused forward; plus a
   cProfile of the launcher, top functions by own time.
2. Kernel-only time of the compose forward/backward at T=4096 for d_out in {4096, 5120, 8192,
   27648}: each config of the comprehensive list, captured K times into one CUDA graph over
   rotating inputs (no host gaps, no L2 reuse), bandwidth against a device copy in the same run
   (1 GiB, and one moving the best config's bytes, timed the same way). ``--kernels-only`` skips 1.
"""

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "code"))

from bench.suite_kernels import _kernel_variants  # noqa: E402
from dorafactors import dora_fused as F  # noqa: E402
from dorafactors import dora_fused_launch as L  # noqa: E402


def host_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def graph_ms(launch, k):
    """Mean ms of launch(i), i = 0..k-1, replayed from one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(k):
            launch(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(k):
            launch(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / k)
    times.sort()
    return times[len(times) // 2]


def copy_gbps():
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    ms = graph_ms(lambda i: dst.copy_(src), 4)
    return 2 * n / (ms * 1e6)


def same_size_copy_gbps(nbytes, k):
    """A copy moving ``nbytes`` (read + write), k rotating buffer pairs, timed like the kernels."""
    half = nbytes // 2
    pairs = [(torch.empty(half, dtype=torch.uint8, device="cuda").fill_(i),
              torch.empty(half, dtype=torch.uint8, device="cuda")) for i in range(k)]
    return 2 * half / (graph_ms(lambda i: pairs[i][1].copy_(pairs[i][0]), k) * 1e6)


def probe_host():
    out = {}
    T, d = 64, 4096
    dev = "cuda"
    base = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    lora = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    m = torch.rand(d, device=dev) + 1
    n = torch.rand(d, device=dev) + 1
    outbuf = torch.empty_like(base)
    out["launcher_us"] = host_us(lambda: F._launch_compose_fwd(base, lora, m, n, 0.5, None, False))
    out["launcher_prealloc_us"] = host_us(lambda: F._launch_compose_fwd(base, lora, m, n, 0.5, None, False, out=outbuf))
    out["compose_trusted_nograd_us"] = host_us(lambda: F.compose_trusted(base, lora, m, n, 0.5))
    out["fixed_config_us"] = host_us(
        lambda: F._launch_compose_fwd(base, lora, m, n, 0.5, None, False, out=outbuf, block_t=16, block_d=256))
    ker = F._kernels()["compose_fwd"]
    acc, is64 = F._acc_of(torch.float32)
    args = (base, lora, m, n, m, outbuf, outbuf, T, d, d, d, d, d, 0.5, F._t_bucket(T))
    consts = dict(HAS_BIAS=False, WRITE_V=False, ACC=acc, IS_FP64=is64, **F._OPTS)
    grid = (T // 16, d // 256)
    ck = ker[grid](*args, **consts, BLOCK_T=16, BLOCK_D=256)
    out["raw_jit_us"] = host_us(lambda: ker[grid](*args, **consts, BLOCK_T=16, BLOCK_D=256))
    try:
        runner = ck[grid]
        full = list(args) + [False, False, acc, is64, 16, 256]
        runner(*full)
        torch.cuda.synchronize()
        ref = F.dora_compose_reference(base, lora, m, n, 0.5)
        out["compiled_direct_ok"] = bool(torch.equal(outbuf, ref))
        out["compiled_direct_us"] = host_us(lambda: runner(*full))
    except Exception as e:  # noqa: BLE001 - a diagnostic: record what failed
        out["compiled_direct_error"] = repr(e)
    out["torch_empty_us"] = host_us(lambda: torch.empty((T, d), dtype=torch.bfloat16, device=dev))
    out["cuda_device_ctx_us"] = host_us(lambda: F._on_device(base).__enter__())
    mg = m.clone().requires_grad_(True)
    bg = base.clone().requires_grad_(True)
    out["apply_fwd_grad_us"] = host_us(lambda: F.FusedDoraCompose.apply(bg, lora, mg, n, 0.5, None, False), 500)
    from dorafactors.dora_fused_linear import compose_lora_b_trusted as compose_lora_b

    ax = torch.randn(T, 16, device=dev, dtype=torch.bfloat16)
    Bw = torch.randn(d, 16, device=dev, dtype=torch.bfloat16)
    out["lora_b_fwd_grad_us"] = host_us(lambda: compose_lora_b(bg, ax, Bw, mg, n, 0.5), 500)
    out["lora_b_matmul_only_us"] = host_us(lambda: torch.matmul(ax, Bw.t()), 500)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        F._launch_compose_fwd(base, lora, m, n, 0.5, None, False)
    prof.disable()
    sio = io.StringIO()
    pstats.Stats(prof, stream=sio).sort_stats("tottime").print_stats(25)
    out["cprofile_launcher_300_calls"] = sio.getvalue()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        compose_lora_b(bg, ax, Bw, mg, n, 0.5)
    prof.disable()
    sio = io.StringIO()
    pstats.Stats(prof, stream=sio).sort_stats("tottime").print_stats(20)
    out["cprofile_lora_b_300_calls"] = sio.getvalue()
    return out


def probe_layer(d=4096, r=16, T=4096, iters=30):
    """Host vs device time of one adapted Linear(d, d) forward+backward (params changed before each
    step, as an optimizer would), ours vs plain LoRA, and a cProfile of ours."""
    import dorafactors
    from peft import LoraConfig, get_peft_model

    res = {}
    for name, dora in (("lora", False), ("ours", True)):
        torch.manual_seed(0)
        holder = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False)).to("cuda", torch.bfloat16)
        if dora:
            dorafactors.enable()
        model = get_peft_model(holder, LoraConfig(r=r, target_modules=["0"], use_dora=dora, init_lora_weights=False))
        params = [p for p in model.parameters() if p.requires_grad]
        x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)

        def step():
            with torch.no_grad():
                for p in params:
                    p.mul_(1.0001)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x)
            out.backward(dy)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        host, wall = [], []
        for _ in range(iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            host.append((t1 - t0) * 1e3)
            wall.append((t2 - t0) * 1e3)
        host.sort(), wall.sort()
        res[name] = {"host_ms": host[iters // 2], "wall_ms": wall[iters // 2]}
        if dora:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(iters):
                step()
            prof.disable()
            torch.cuda.synchronize()
            sio = io.StringIO()
            pstats.Stats(prof, stream=sio).sort_stats("tottime").print_stats(30)
            res["cprofile_ours"] = sio.getvalue()
            dorafactors.disable()
    return res


def probe_kernels(comprehensive, d_outs, T=4096):
    rows = []
    bw = copy_gbps()
    import triton

    configs = L.autotune_configs(True)["compose_fwd"] if comprehensive else [
        triton.Config({"BLOCK_T": t, "BLOCK_D": dd}, num_warps=w, num_stages=1)
        for t, dd in ((4, 512), (4, 1024), (8, 256), (8, 512), (8, 1024), (16, 128), (16, 256), (16, 512),
                      (32, 128), (32, 256), (64, 64), (64, 128)) for w in (4, 8)]
    ker = F._kernels()
    acc, is64 = F._acc_of(torch.float32)
    for d in d_outs:
        k = max(2, min(8, (4 * 52428800) // (2 * T * d * 2) + 1))
        sets = [(torch.randn(T, d, device="cuda", dtype=torch.bfloat16),
                 torch.randn(T, d, device="cuda", dtype=torch.bfloat16)) for _ in range(k)]
        m = torch.rand(d, device="cuda") + 1
        n = torch.rand(d, device="cuda") + 1
        outs = [torch.empty(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(k)]
        vs = [torch.empty(T, d, device="cuda", dtype=torch.float32) for _ in range(k)]
        dbs = [torch.empty(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(k)]
        chunks = F._cdiv(T, F._default_t_chunk(T))
        pdm = torch.empty(chunks, d, device="cuda")
        variants = {
            "fwd": (6, False), "fwd_v32": (10, True),
            "bwd_dbase_dm(base)": (6, None), "bwd_dbase_dlora_dm(v32)": (10, None),
        }
        for name, (bpe, write_v) in variants.items():
            best = None
            for c in configs:
                bt, bd = c.kwargs["BLOCK_T"], c.kwargs["BLOCK_D"]
                if bd > 2 * d:
                    continue
                opts = dict(num_warps=c.num_warps, num_stages=c.num_stages)
                if name.startswith("fwd"):
                    def launch(i, bt=bt, bd=bd, opts=opts, write_v=write_v):
                        b, lo = sets[i]
                        ker["compose_fwd"][(F._cdiv(T, bt), F._cdiv(d, bd))](
                            b, lo, m, n, m, outs[i], vs[i] if write_v else outs[i], T, d, d, d, d, d, 0.5,
                            F._t_bucket(T), HAS_BIAS=False, WRITE_V=write_v, ACC=acc, IS_FP64=is64, **F._OPTS,
                            BLOCK_T=bt, BLOCK_D=bd, **opts)
                else:
                    with_lora = "dlora" in name

                    def launch(i, bt=bt, bd=bd, opts=opts, with_lora=with_lora):
                        dy, base = sets[i]
                        saved = vs[i] if with_lora else base
                        tc = F._default_t_chunk(T)
                        ker["compose_bwd"][(F._cdiv(d, bd), F._cdiv(T, tc))](
                            dy, saved, m, n, dbs[i], outs[i] if with_lora else dbs[i], pdm, pdm, T, d, tc,
                            d, d, d, d, 0.5, F._t_bucket(T), NEED_DBASE=True, NEED_DLORA=with_lora, NEED_DM=True,
                            NEED_DBIAS=False, ACC=acc, IS_FP64=is64, **F._OPTS, BLOCK_T=bt, BLOCK_D=bd, **opts)
                try:
                    ms = graph_ms(launch, k)
                except Exception as e:  # noqa: BLE001
                    rows.append({"d_out": d, "kernel": name, "config": str(c), "error": repr(e)[:200]})
                    continue
                gbps = bpe * T * d / (ms * 1e6)
                row = {"d_out": d, "kernel": name, "config": f"T{bt} D{bd} w{c.num_warps} s{c.num_stages}",
                       "ms": ms, "gbps": gbps, "pct_copy": 100 * gbps / bw}
                rows.append(row)
                if best is None or ms < best["ms"]:
                    best = row
            best["best"] = True
            if name in ("fwd", "bwd_dbase_dm(base)"):
                # the library's own launcher (autotuned pick, direct launch), called as the micro suite's
                # kernel rows call it
                fwd = name == "fwd"
                launch = dict((v[0], v[2]) for v in _kernel_variants(F, fwd))["fused_kernel_layer"]
                if fwd:
                    def tuned(i, launch=launch):
                        return launch(sets[i][0], sets[i][1], None, m, n, 0.5)
                else:
                    def tuned(i, launch=launch):
                        return launch(sets[i][1], None, sets[i][0], m, n, 0.5)
                tuned_ms = graph_ms(tuned, k)
                picks = [repr(v) for key, v in F._chosen.items()
                         if key[0] == ("compose_fwd" if name == "fwd" else "compose_bwd") and key[3][0] == d]
                best["launcher_ms"], best["launcher_picks"] = tuned_ms, picks
                print(f"d_out {d:6d} {name:26s} launcher {tuned_ms*1e3:7.1f} us, picked {picks}", flush=True)
            same = same_size_copy_gbps(bpe * T * d, k)
            best["pct_same_size_copy"] = 100 * best["gbps"] / same
            print(f"d_out {d:6d} {name:26s} best {best['config']:20s} {best['ms']*1e3:7.1f} us "
                  f"{best['pct_copy']:5.1f}% of copy, {best['pct_same_size_copy']:5.1f}% of a same-size copy",
                  flush=True)
        del sets, outs, vs, dbs
        torch.cuda.empty_cache()
    return bw, rows


def probe_lora_b_fwd(d_outs, ranks, T=4096):
    """The fused linear's forward as one kernel (lora_B's GEMM with the compose as its epilogue)
    against cuBLAS's GEMM followed by the compose kernel, device time (CUDA-graph replay)."""
    from dorafactors import dora_fused_linear as FL

    rows = []
    for d in d_outs:
        for r in ranks:
            k = max(2, min(8, (4 * 52428800) // (2 * T * d * 2) + 1))
            base = [torch.randn(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(k)]
            ax = [torch.randn(T, r, device="cuda", dtype=torch.bfloat16) for _ in range(k)]
            B = torch.randn(d, r, device="cuda") * 0.02
            m, n = torch.rand(d, device="cuda") + 1, torch.rand(d, device="cuda") + 1
            tail = FL.tail_vectors(m, n, 0.5)
            B16 = B.to(torch.bfloat16)

            def one(i):
                return FL._launch_lora_b_fwd(base[i], ax[i], B, tail, 0.5, None)

            def pair(i):
                lora = torch.nn.functional.linear(ax[i], B16)
                return F._launch_compose_fwd(base[i], lora, tail.m, tail.n, 0.5, None, False)[0]

            def one_b16(i):  # B already in the activation dtype (cast once outside)
                return FL._launch_lora_b_fwd(base[i], ax[i], B16, tail, 0.5, None)

            row = {"d_out": d, "r": r, "T": T}
            for name, fn in (("one_kernel", one), ("one_kernel_bf16_B", one_b16), ("gemm_plus_compose", pair)):
                try:
                    row[name + "_ms"] = graph_ms(fn, k)
                except Exception as e:  # noqa: BLE001
                    row[name + "_error"] = repr(e)[:200]
            if "one_kernel_ms" in row and "gemm_plus_compose_ms" in row:
                row["one_over_pair"] = row["one_kernel_ms"] / row["gemm_plus_compose_ms"]
                print(f"lora_b fwd d_out {d:6d} r {r:4d}: one kernel {row['one_kernel_ms']*1e3:7.1f} us "
                      f"(bf16 B {row.get('one_kernel_bf16_B_ms', float('nan'))*1e3:7.1f}), "
                      f"GEMM + compose {row['gemm_plus_compose_ms']*1e3:7.1f} us ({row['one_over_pair']:.2f}x)",
                      flush=True)
            rows.append(row)
            del base, ax
            torch.cuda.empty_cache()
    for key, config in F._chosen.items():
        if key[0] == "lora_b_fwd":
            rows.append({"chosen_for": repr(key[3][:3] + key[3][4:8]), "config": repr(config)})
            print("chosen", key[3][:3], key[3][5:7], config, flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--comprehensive", action="store_true")
    p.add_argument("--d-outs", default="4096,5120,8192,27648")
    p.add_argument("--host-only", action="store_true", help="skip the kernel sweep")
    p.add_argument("--kernels-only", action="store_true", help="only the kernel sweep")
    p.add_argument("--lora-b-only", action="store_true",
                   help="of the kernel sweep, only the one-kernel forward against GEMM + compose")
    a = p.parse_args()
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import triton

    res["triton"] = triton.__version__
    if not a.kernels_only:
        res["host"] = probe_host()
        print({k: v for k, v in res["host"].items() if not k.startswith("cprofile")}, flush=True)
        print(res["host"]["cprofile_lora_b_300_calls"][:1500], flush=True)
        res["layer"] = probe_layer()
        print({k: v for k, v in res["layer"].items() if k != "cprofile_ours"}, flush=True)
        print(res["layer"]["cprofile_ours"][:6000], flush=True)
    if not a.host_only:
        d_outs = [int(x) for x in a.d_outs.split(",")]
        if not a.lora_b_only:
            res["copy_gbps"], res["kernels"] = probe_kernels(a.comprehensive, d_outs)
        res["lora_b_fwd"] = probe_lora_b_fwd(d_outs, [16, 128, 384, 768])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
