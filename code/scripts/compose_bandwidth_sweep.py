#!/usr/bin/env python
"""Compose kernels against the copy bandwidth, and what would move them (GPU diagnostic).

    python code/scripts/compose_bandwidth_sweep.py --out $OUT/compose_sweep.json

At T=4096, bf16, for d_out in {4096, 8192, 27648, 5120}, every time a CUDA-graph replay of at least
32 launches over rotating inputs (``bench.timing.measure_graph``, as the micro suite's kernel rows):

* yardsticks: the suite's 1 GiB copy; a copy moving the kernel's bytes; ``torch.add(base, lora,
  alpha=s)``, PyTorch's own two-reads-one-write elementwise kernel;
* the library's autotuned launchers, as the layer runs them (forward: ``out = g ⊙ (base + s·lora)``;
  backward: ``∂base = g ⊙ dy`` and ∂m's per-chunk sums ``Σ_t dy·base``);
* candidate kernels, same math: the production tiles and larger ones, with and without streaming
  cache hints (loads ``evict_first``, stores ``.cs``), the forward with several row blocks per
  program (``g`` computed once), the backward with other T chunks.

Prints a table per shape (GB/s and % of the 1 GiB copy) and writes every row to ``--out``.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "code"))

from bench.suite_kernels import _graph_copy_gbps, _kernel_variants  # noqa: E402
from bench.timing import measure, measure_graph, rotation_count  # noqa: E402
from dorafactors import dora_fused as F  # noqa: E402


@triton.jit
def _fwd(base_ptr, lora_ptr, m_ptr, n_ptr, out_ptr, T, d_out, s,
         HINT: tl.constexpr, LOOP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d_out
    g = tl.div_rn(tl.load(m_ptr + cols, mask=cmask, other=0.0), tl.load(n_ptr + cols, mask=cmask, other=1.0))
    for k in range(LOOP):
        rows = ((pid_t * LOOP + k) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = (rows < T)[:, None] & cmask[None, :]
        offs = rows[:, None] * d_out + cols[None, :]
        if HINT:
            b = tl.load(base_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            lo = tl.load(lora_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            tl.store(out_ptr + offs, (g[None, :] * (b + s * lo)).to(out_ptr.dtype.element_ty), mask=mask,
                     cache_modifier=".cs")
        else:
            b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            lo = tl.load(lora_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, (g[None, :] * (b + s * lo)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd(dy_ptr, base_ptr, m_ptr, n_ptr, dbase_ptr, pdm_ptr, T, d_out, t_chunk,
         HINT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_c = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d_out
    g = tl.div_rn(tl.load(m_ptr + cols, mask=cmask, other=0.0), tl.load(n_ptr + cols, mask=cmask, other=1.0))
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    t_lo = pid_c * t_chunk
    t_hi = tl.minimum(t_lo + t_chunk, T)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        rows = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = (rows < t_hi)[:, None] & cmask[None, :]
        offs = rows[:, None] * d_out + cols[None, :]
        if HINT:
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            w = tl.load(base_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            tl.store(dbase_ptr + offs, (g[None, :] * dy).to(dbase_ptr.dtype.element_ty), mask=mask,
                     cache_modifier=".cs")
        else:
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dbase_ptr + offs, (g[None, :] * dy).to(dbase_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(dy * w, axis=0)
    tl.store(pdm_ptr + pid_c * d_out + cols, acc, mask=cmask)


FWD_TILES = [(8, 512, 8), (8, 256, 8), (4, 512, 8), (8, 256, 4), (16, 512, 8), (16, 256, 8), (32, 256, 8),
             (4, 1024, 8), (8, 1024, 8), (16, 1024, 16), (2, 1024, 4), (32, 128, 4)]
BWD_TILES = [(64, 128, 4), (64, 64, 4), (32, 128, 4), (8, 256, 4), (32, 256, 8), (16, 256, 4), (128, 64, 4),
             (64, 256, 8)]


def one_gib_copy_gbps(device) -> float:
    """The micro suite's yardstick: a 1 GiB ``copy_`` over two rotating sources, timed with events."""
    size = 1 << 30
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    srcs = [torch.empty(size, dtype=torch.uint8, device=device).fill_(i) for i in range(2)]
    stats = measure(lambda i: dst.copy_(srcs[i % 2]), device=device, warmup=3, repeats=20)
    return 2 * size / (stats.median * 1e6)


def sweep_shape(d_out: int, T: int, copy_gbps: float, device) -> list:
    rows = []
    dt = torch.bfloat16
    count = rotation_count(2 * T * d_out * 2, device)
    gen = torch.Generator(device=device).manual_seed(d_out)
    sets = [tuple(torch.randn(T, d_out, generator=gen, device=device).to(dt) for _ in range(3)) for _ in range(count)]
    n = 1.0 + torch.rand(d_out, generator=gen, device=device)
    m = n * (1 + 0.01 * torch.randn(d_out, generator=gen, device=device))
    s = 0.5
    nbytes = 3 * T * d_out * 2  # both kernels: two [T, d_out] reads, one write
    outs = [torch.empty(T, d_out, dtype=dt, device=device) for _ in range(count)]
    chunks_max = -(-T // 64)
    pdm = torch.empty(chunks_max, d_out, dtype=torch.float32, device=device)

    def row(kind, name, launch, **extra):
        try:
            ms = measure_graph(launch, count, device=device).median
        except Exception as exc:  # noqa: BLE001 - one failing candidate must not lose the others
            rows.append(dict(d_out=d_out, kind=kind, name=name, error=f"{type(exc).__name__}: {exc}", **extra))
            return
        gbps = nbytes / (ms * 1e6)
        rows.append(dict(d_out=d_out, kind=kind, name=name, ms=ms, gbps=gbps, pct_1gib_copy=100 * gbps / copy_gbps,
                         **extra))

    same = _graph_copy_gbps(nbytes, count, device)  # the micro suite's same-size yardstick
    rows.append(dict(d_out=d_out, kind="yardstick", name="same_size_copy", ms=nbytes / (same * 1e6), gbps=same,
                     pct_1gib_copy=100 * same / copy_gbps))
    row("yardstick", "torch_add_alpha", lambda i: torch.add(sets[i][0], sets[i][1], alpha=s, out=outs[i]))
    for kind, fwd in (("fwd", True), ("bwd", False)):
        for name, _bytes, launch in _kernel_variants(F, fwd):
            if name == "fused_kernel_layer":
                row(kind, "library_autotuned", lambda i, launch=launch: launch(sets[i][0], sets[i][1], sets[i][2], m, n, s))
    for bt, bd, w in FWD_TILES:
        for hint in (0, 1):
            for loop in (1, 4):
                grid = (triton.cdiv(T, bt * loop), triton.cdiv(d_out, bd))
                row("fwd", f"tile{bt}x{bd}w{w}", lambda i, g=grid, bt=bt, bd=bd, w=w, h=hint, lp=loop: _fwd[g](
                    sets[i][0], sets[i][1], m, n, outs[i], T, d_out, s, HINT=h, LOOP=lp, BLOCK_T=bt, BLOCK_D=bd,
                    num_warps=w), hint=hint, loop=loop)
    for bt, bd, w in BWD_TILES:
        for hint in (0, 1):
            for t_chunk in (128, 256, 512):
                if t_chunk < bt:
                    continue
                grid = (triton.cdiv(d_out, bd), triton.cdiv(T, t_chunk))
                row("bwd", f"tile{bt}x{bd}w{w}", lambda i, g=grid, bt=bt, bd=bd, w=w, h=hint, tc=t_chunk: _bwd[g](
                    sets[i][2], sets[i][0], m, n, outs[i], pdm, T, d_out, tc, HINT=h, BLOCK_T=bt, BLOCK_D=bd,
                    num_warps=w), hint=hint, t_chunk=t_chunk)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-out", type=int, nargs="+", default=[4096, 8192, 27648, 5120])
    args = p.parse_args()
    device = torch.device("cuda")
    copy_gbps = one_gib_copy_gbps(device)
    result = dict(gpu=torch.cuda.get_device_name(device), torch=torch.__version__, triton=triton.__version__,
                  tokens=args.tokens, copy_1gib_gbps=copy_gbps, rows=[])
    print(f"{result['gpu']}: 1 GiB copy {copy_gbps:.0f} GB/s")
    for d_out in args.d_out:
        rows = sweep_shape(d_out, args.tokens, copy_gbps, device)
        torch.cuda.empty_cache()  # the shape's buffers are gone with its frame
        result["rows"].extend(rows)
        ok = [r for r in rows if "gbps" in r]
        print(f"\nd_out={d_out}")
        for r in ok:
            if r["kind"] == "yardstick" or r["name"] == "library_autotuned":
                print(f"  {r['kind']:9s} {r['name']:22s} {r['gbps']:7.0f} GB/s {r['pct_1gib_copy']:6.1f}%")
        for kind in ("fwd", "bwd"):
            best = sorted((r for r in ok if r["kind"] == kind and r["name"] != "library_autotuned"),
                          key=lambda r: r["ms"])[:5]
            for r in best:
                extra = {k: r[k] for k in ("hint", "loop", "t_chunk") if k in r}
                print(f"  {kind:9s} {r['name']:22s} {r['gbps']:7.0f} GB/s {r['pct_1gib_copy']:6.1f}%  {extra}")
        print(f"  errors: {sum('error' in r for r in rows)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
