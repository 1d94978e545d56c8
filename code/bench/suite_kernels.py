"""Kernel-level suites: ``norm`` (the row norm) and ``compose`` (the elementwise composition).

norm: ours ``dorafactors.dora.factored_row_norm(W, A, B, s)`` against the reference's dense
``get_weight_norm(W, B·A, s)`` (case ``row_norm``: ``B·A`` formed under the same autocast) and against
the norm exactly as the reference's forward computes it (case ``row_norm_as_forward``: an fp32
identity through the fp32 adapters, an fp32 copy of ``W``), over d_in, d_out and r.

compose: ``out = g ⊙ (base + s·lora)`` over ``[T, d_out]`` forward and backward: the reference's
eager expression, ours eager, ours fused (``dora_fused.dora_compose``) and, as the floor, PEFT
LoRA's own elementwise work ``base + lora·s``; achieved GB/s of the nominal traffic (forward reads
base and lora and writes out; backward reads dy, base, lora and writes d_base, d_lora) against a
device-to-device copy measured in the same run.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .common import DTYPES, TOLERANCE, Case, autocast, compare, exact_row_norm
from .memory import CPU_REASON, PeakMemory, release
from .providers import fused_module
from .timing import measure, measure_graph, rotation_count

__all__ = ["plan_norm", "run_norm", "plan_compose", "run_compose"]


def plan_norm(cfg) -> list[Case]:
    cases = []
    for dtype in cfg.dtypes:
        for d_in, d_out in cfg.shapes.values():
            for r in cfg.ranks_for("norm"):
                for name in ("row_norm", "row_norm_as_forward"):
                    cases.append(Case("norm", name, {"d_in": d_in, "d_out": d_out, "r": r}, dtype))
    return cases


def _norm_inputs(d_in: int, d_out: int, r: int, dtype: torch.dtype, device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    W = (torch.randn(d_out, d_in, generator=gen, device=device) * 0.02).to(dtype)
    bound = 1.0 / math.sqrt(d_in)
    A = torch.rand(r, d_in, generator=gen, device=device).mul_(2 * bound).sub_(bound)
    B = torch.randn(d_out, r, generator=gen, device=device) * (0.02 * math.sqrt(3.0 / r) * 0.05)
    return W, A, B


def _time_rotating(fn: Callable, sets: list[tuple], device, warmup: int, repeats: int):
    """Time ``fn(*sets[i])`` with the input sets rotated across calls."""
    return measure(lambda i: fn(*sets[i % len(sets)]), device=device, warmup=warmup, repeats=repeats)


def run_norm(case: Case, ctx) -> None:
    cfg, device, rec = ctx.cfg, ctx.device, ctx.rec
    p = case.params
    dtype = DTYPES[case.dtype]
    repeats, warmup = cfg.timing_for("norm")
    s = 1.0
    n_inputs = rotation_count(p["d_out"] * p["d_in"] * dtype.itemsize, device)
    sets = [_norm_inputs(p["d_in"], p["d_out"], p["r"], dtype, device, cfg.seed + i) for i in range(n_inputs)]
    truth = exact_row_norm(*sets[0], s)

    from dorafactors.dora import factored_row_norm

    impls: dict[str, Callable] = {}
    ref = ctx.reference
    if ref is not None:
        ref_layer = ref.DoraLinearLayer(fan_in_fan_out=False)
        if case.name == "row_norm":
            def ref_norm(W, A, B):
                lora_weight = B @ A  # under the case's autocast: in the working dtype, like PEFT's forward
                return ref_layer.get_weight_norm(W, lora_weight, s)
        else:
            def ref_norm(W, A, B):
                # the reference's forward: x is cast to the fp32 adapter dtype, so its identity and W copy are fp32
                x_eye = torch.eye(A.shape[1], device=A.device, dtype=A.dtype)
                lora_weight = F.linear(F.linear(x_eye, A), B).T
                return ref_layer.get_weight_norm(W.to(A.dtype), lora_weight.detach(), s)
        impls["peft_ref"] = ref_norm
    impls["ours_eager"] = lambda W, A, B: factored_row_norm(W, A, B, s)

    outputs: dict[str, torch.Tensor] = {}
    for provider, check_only in ctx.reference_first():
        name = provider.name
        if name not in ("peft_ref", "ours_eager"):
            continue
        if not provider.available or name not in impls:
            rec.skip(case, name, "time", "ms", provider.reason or "not available")
            continue
        fn = impls[name]
        with torch.no_grad(), autocast(device, case.dtype, cfg.autocast):
            out = fn(*sets[0]).float()
            outputs[name] = out
            if check_only:
                continue
            err = compare(out, truth)
            rec.add(case, name, "err_rel_rms_vs_fp64", err["rel_rms"], "1")
            if name != "peft_ref" and "peft_ref" in outputs:
                diff = compare(out, outputs["peft_ref"])["rel_rms"]
                if not diff <= TOLERANCE[case.dtype]:
                    rec.fail(case, name, "correctness", "1",
                             f"rel-RMS {diff:.3g} vs the reference exceeds {TOLERANCE[case.dtype]:g}")
                    rec.fail(case, name, "time", "ms", "failed the correctness check: no speed number")
                    continue
                rec.add(case, name, "correctness", diff, "1", note="rel-RMS vs the reference's output")
            stats = _time_rotating(fn, sets, device, warmup, repeats)
            rec.add(case, name, "time", stats.median, "ms", spread=stats.spread())
            release(device)
            with PeakMemory(device) as pm:
                fn(*sets[0])
            if pm.peak_extra is None:
                rec.skip(case, name, "peak_extra_mem", "bytes", CPU_REASON)
            else:
                rec.add(case, name, "peak_extra_mem", pm.peak_extra, "bytes")
    del sets, outputs
    release(device)


# ---------------------------------------------------------------------------------------------
# compose
# ---------------------------------------------------------------------------------------------


def plan_compose(cfg) -> list[Case]:
    cases = [Case("compose", "copy_bandwidth", {"bytes": 0}, cfg.dtypes[0])]
    d_outs = list(dict.fromkeys(d_out for _d_in, d_out in cfg.shapes.values()))
    for dtype in cfg.dtypes:
        for d_out in d_outs:
            for name in ("fwd", "bwd"):
                cases.append(Case("compose", name, {"T": cfg.tokens, "d_out": d_out}, dtype))
    return cases


def copy_bandwidth(ctx) -> Optional[float]:
    """GB/s of ``dst.copy_(src)`` (2 bytes moved per byte copied), measured once per run."""
    if getattr(ctx, "copy_gbps", None) is not None:
        return ctx.copy_gbps
    device = ctx.device
    size = (1 << 30) if device.type == "cuda" else (64 << 20)
    repeats, warmup = ctx.cfg.timing_for("compose")
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    sets = [(torch.empty(size, dtype=torch.uint8, device=device).fill_(i),) for i in range(2)]
    stats = _time_rotating(dst.copy_, sets, device, warmup, repeats)
    ctx.copy_gbps = 2 * size / (stats.median * 1e6)
    ctx.copy_stats = (size, stats)
    del sets, dst
    release(device)
    return ctx.copy_gbps


def _compose_impls(ctx) -> dict[str, tuple[Optional[Callable], Optional[str]]]:
    """provider -> (f(base, lora, m, n, s) -> out in base.dtype, reason when unavailable)."""
    impls: dict[str, tuple[Optional[Callable], Optional[str]]] = {}

    def lora_floor(base, lora, m, n, s):  # PEFT LoRA: lora_B(...) * scaling, then result + that
        return base + lora * s

    def ref_compose(base, lora, m, n, s):  # the reference's forward and PEFT's add, then its cast back
        g = (m / n).view(1, -1)
        result_dora = (g - 1) * base + g * lora * s
        return (base + result_dora).to(base.dtype)

    impls["lora"] = (lora_floor, None)
    impls["peft_ref"] = (ref_compose, None)
    from dorafactors import dora as ours

    eager = getattr(ours, "_compose_delta_eager", None)
    if eager is None:
        impls["ours_eager"] = (None, "dorafactors.dora has no _compose_delta_eager")
    else:
        impls["ours_eager"] = (lambda base, lora, m, n, s: base + eager(base, lora, m, n, s, -1).to(base.dtype), None)
    module, reason = fused_module() if ctx.device.type == "cuda" else (None, "the fused path needs a CUDA device")
    if module is not None and not hasattr(module, "dora_compose"):
        module, reason = None, "dorafactors.dora_fused has no dora_compose"
    impls["ours_fused"] = ((lambda base, lora, m, n, s: module.dora_compose(base, lora, m, n, s)) if module else None,
                           reason)
    return impls


def _rate_spread(stats, numerator: float) -> dict:
    """Spread of ``numerator / time`` from the spread of the times (quantiles swap ends)."""
    q25, q75 = numerator / stats.q75, numerator / stats.q25
    return {"iqr": q75 - q25, "q25": q25, "q75": q75, "min": numerator / stats.max, "max": numerator / stats.min,
            "n": stats.n}


def _time_compose(fn: Callable, sets: list[tuple], m, n, s: float, *, backward: bool, device, warmup: int,
                  repeats: int):
    """Time the forward ``fn(base, lora, m, n, s)``, or only its backward (the graph is built untimed)."""
    leaves = [(b.detach().requires_grad_(True), lo.detach().requires_grad_(True), dy) for b, lo, dy in sets]
    if not backward:
        return measure(lambda i: fn(*leaves[i % len(leaves)][:2], m, n, s), device=device, warmup=warmup,
                       repeats=repeats)
    held: dict[str, torch.Tensor] = {}

    def before(i):
        b, lo, _ = leaves[i % len(leaves)]
        b.grad = lo.grad = m.grad = None
        held["out"] = fn(b, lo, m, n, s)

    def run(i):
        held.pop("out").backward(leaves[i % len(leaves)][2])

    return measure(run, device=device, warmup=warmup, repeats=repeats, before=before)


def run_compose(case: Case, ctx) -> None:
    cfg, device, rec = ctx.cfg, ctx.device, ctx.rec
    if case.name == "copy_bandwidth":
        gbps = copy_bandwidth(ctx)
        size, stats = ctx.copy_stats
        rec.add(case, "torch_copy", "bandwidth", gbps, "GB/s", shape={"bytes": size},
                spread=_rate_spread(stats, 2 * size / 1e6), note="device-to-device copy; GB/s = 2·bytes / time")
        return
    dtype = DTYPES[case.dtype]
    T, d_out = case.params["T"], case.params["d_out"]
    repeats, warmup = cfg.timing_for("compose")
    s = 0.5
    esize = dtype.itemsize
    nominal = (3 if case.name == "fwd" else 5) * T * d_out * esize
    n_inputs = rotation_count(2 * T * d_out * esize, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    sets = []
    for _ in range(n_inputs):
        base = torch.randn(T, d_out, generator=gen, device=device).to(dtype)
        lora = torch.randn(T, d_out, generator=gen, device=device).to(dtype)
        dy = torch.randn(T, d_out, generator=gen, device=device).to(dtype)
        sets.append((base, lora, dy))
    n = 1.0 + torch.rand(d_out, generator=gen, device=device)
    m = (n * (1 + 0.01 * torch.randn(d_out, generator=gen, device=device))).requires_grad_(True)
    copy_gbps = copy_bandwidth(ctx)
    ref_out: dict[str, torch.Tensor] = {}
    impls = _compose_impls(ctx)
    for provider, check_only in ctx.reference_first():
        name = provider.name
        if name not in impls:
            continue
        fn, reason = impls[name]
        if fn is None or not provider.available:
            rec.skip(case, name, "time", "ms", reason or provider.reason or "not available")
            continue
        # correctness: output and gradients against the reference's expression
        base, lora, dy = (t.detach().clone().requires_grad_(k < 2) for k, t in enumerate(sets[0]))
        m.grad = None
        out = fn(base, lora, m, n, s)
        out.backward(dy)
        results = {"out": out.detach(), "d_base": base.grad, "d_lora": lora.grad}
        if m.grad is not None:
            results["d_m"] = m.grad.clone()
        if name == "peft_ref":
            ref_out = results
            if check_only:
                continue
        elif name != "lora" and ref_out:
            worst = max(compare(results[k], ref_out[k])["rel_rms"] for k in results if k in ref_out)
            if not worst <= TOLERANCE[case.dtype]:
                rec.fail(case, name, "correctness", "1",
                         f"worst rel-RMS {worst:.3g} of out/d_base/d_lora/d_m vs the reference exceeds "
                         f"{TOLERANCE[case.dtype]:g}")
                rec.fail(case, name, "time", "ms", "failed the correctness check: no speed number")
                continue
            rec.add(case, name, "correctness", worst, "1", note="worst rel-RMS of out/d_base/d_lora/d_m vs reference")
        stats = _time_compose(fn, sets, m, n, s, backward=case.name == "bwd", device=device, warmup=warmup,
                              repeats=repeats)
        gbps = nominal / (stats.median * 1e6)
        rec.add(case, name, "time", stats.median, "ms", spread=stats.spread())
        rec.add(case, name, "bandwidth", gbps, "GB/s", spread=_rate_spread(stats, nominal / 1e6),
                note=f"nominal {nominal} bytes moved")
        rec.add(case, name, "pct_of_copy_bandwidth", 100.0 * gbps / copy_gbps, "%")
    if device.type == "cuda" and impls["ours_fused"][0] is not None:
        _record_kernel_bandwidth(case, ctx, sets, m.detach(), n, s, copy_gbps)
    del sets
    release(device)


# Kernel-only variants: (name, bytes per element as a function of the element size, launch).
# "layer" is what the DoRA linear layer runs (lora_B's GEMM in the Function, base kept for ∂m);
# "v32" the compose alone, which keeps v = base + s·lora in fp32 for ∂m.
def _kernel_variants(F, fwd: bool):
    acc = torch.float32
    if fwd:
        return [
            ("fused_kernel_layer", lambda e: 3 * e,
             lambda b, lo, dy, m, n, s: F._launch_compose_fwd(b, lo, m, n, s, None, False)),
            ("fused_kernel_v32", lambda e: 3 * e + 4,
             lambda b, lo, dy, m, n, s: F._launch_compose_fwd(b, lo, m, n, s, None, True)),
        ]
    return [
        # reads dy, base; writes d_base and ∂m's per-chunk partials, which the layer's [d_out, r] tail
        # kernel sums (so no reduction op here either)
        ("fused_kernel_layer", lambda e: 3 * e,
         lambda b, lo, dy, m, n, s: F._launch_compose_bwd(
             dy, b, m, n, s, saved_is_out=False, need_dbase=True, need_dlora=False, need_dm=True,
             need_dbias=False, lora_dtype=dy.dtype, acc_dtype=acc, reduce_dm=False)),
        ("fused_kernel_v32", lambda e: 4 * e + 4,  # reads dy, v (fp32); writes d_base, d_lora
         lambda b, lo, dy, m, n, s: F._launch_compose_bwd(
             dy, lo, m, n, s, saved_is_out=False, need_dbase=True, need_dlora=True, need_dm=True,
             need_dbias=False, lora_dtype=dy.dtype, acc_dtype=acc)),
    ]


def _graph_copy_gbps(nbytes: int, count: int, device) -> float:
    """GB/s of ``dst.copy_(src)`` moving ``nbytes`` (read + write) per call, replayed from a CUDA graph
    over ``count`` rotating buffer pairs: the yardstick for a kernel of that size timed that way (a
    1 GiB copy hides the fixed cost of a launch that a 100 MB kernel pays)."""
    half = nbytes // 2
    pairs = [(torch.empty(half, dtype=torch.uint8, device=device).fill_(i % 251),
              torch.empty(half, dtype=torch.uint8, device=device)) for i in range(count)]
    stats = measure_graph(lambda i: pairs[i][1].copy_(pairs[i][0]), count, device=device)
    del pairs
    return 2 * half / (stats.median * 1e6)


def _record_kernel_bandwidth(case: Case, ctx, sets, m, n, s: float, copy_gbps: float) -> None:
    """The fused compose kernels alone (CUDA-graph replay over rotating inputs): GB/s of the bytes
    they actually move, against the copy bandwidth (issue goal: >= 85%)."""
    F, _reason = fused_module()
    T, d_out = case.params["T"], case.params["d_out"]
    esize = DTYPES[case.dtype].itemsize
    for name, bytes_per_elem, launch in _kernel_variants(F, case.name == "fwd"):
        if name.endswith("v32") and case.name == "bwd":  # v in fp32, as the compose forward keeps it
            inputs = [(b, lo.float(), dy) for b, lo, dy in sets]
        else:
            inputs = list(sets)
        try:
            stats = measure_graph(lambda i: launch(*inputs[i], m, n, s), len(inputs), device=ctx.device)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
            ctx.rec.fail(case, name, "kernel_time", "ms", f"{type(exc).__name__}: {exc}")
            continue
        nbytes = bytes_per_elem(esize) * T * d_out
        gbps = nbytes / (stats.median * 1e6)
        ctx.rec.add(case, name, "kernel_time", stats.median, "ms", spread=stats.spread(),
                    note=f"CUDA-graph replay, {len(inputs)} rotating input sets; roofline "
                         f"{nbytes / (copy_gbps * 1e6):.4f} ms at the copy bandwidth")
        ctx.rec.add(case, name, "kernel_bandwidth", gbps, "GB/s", spread=_rate_spread(stats, nbytes / 1e6),
                    note=f"{nbytes} bytes actually moved")
        ctx.rec.add(case, name, "kernel_pct_of_copy_bandwidth", 100.0 * gbps / copy_gbps, "%")
        same = _graph_copy_gbps(nbytes, len(inputs), ctx.device)
        ctx.rec.add(case, name, "kernel_pct_of_same_size_copy", 100.0 * gbps / same, "%",
                    note=f"against a device copy moving the same {nbytes} bytes, timed the same way "
                         f"(CUDA-graph replay, rotating buffers): {same:.0f} GB/s")
        del inputs
