"""Layer-level suites: one adapted ``nn.Linear(d_in, d_out)`` in the model dtype inside a PEFT model.

layer: time of the inference forward (eval, no_grad) and of forward+backward, the latter twice:
``fwd_bwd`` with the adapter parameters changed in place before every repeat (outside the timed
region, as an optimizer step would: every repeat pays the norm) and ``fwd_bwd_accum`` with the
parameters left alone (a micro-batch inside a gradient-accumulation window); on CUDA both again as
the GPU's busy time alone (``*_device``: kernel durations from torch.profiler, host excluded).
memory: peak memory above the static footprint per phase, and the adapter parameters' bytes.
stability: error of output and gradients against an fp64 evaluation of the same weights in the
near-unity regime (``‖s·B·A‖ = 1e-3·‖W‖``, ``m = n·(1 + 1e-3·ε)``), per DoRA provider and dtype.

Every provider of a case sees the same base weight, adapter values, inputs and upstream gradient.
The input requires grad (as inside a network), so backward also computes ``dx``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import (
    DTYPES,
    TOLERANCE,
    Case,
    autocast,
    compare,
    exact_row_norm,
    lora_layers,
    perturb_,
    set_adapters,
    trainable,
    zero_grads,
)
from .memory import CPU_REASON, PeakMemory, allocated, release
from .providers import Provider, wrap_model
from .timing import measure, rotation_count

__all__ = ["plan_layer", "run_layer", "plan_memory", "run_memory", "plan_stability", "run_stability"]

RHO, MAG_NOISE = 0.05, 0.01  # layer and memory suites
STAB_RHO, STAB_MAG_NOISE = 1e-3, 1e-3  # stability: the near-unity regime


class _Holder(torch.nn.Module):
    def __init__(self, proj: torch.nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _plan(cfg, suite: str, names: tuple[str, ...]) -> list[Case]:
    return [Case(suite, name, {"d_in": d_in, "d_out": d_out, "r": r, "T": cfg.tokens}, dtype)
            for dtype in cfg.dtypes for d_in, d_out in cfg.shapes.values() for r in cfg.ranks_for(suite)
            for name in names]


def plan_layer(cfg) -> list[Case]:
    return _plan(cfg, "layer", ("linear",))


def plan_memory(cfg) -> list[Case]:
    return _plan(cfg, "memory", ("linear",))


def plan_stability(cfg) -> list[Case]:
    return _plan(cfg, "stability", ("vs_fp64",))


def _base_linear(d_in: int, d_out: int, dtype: torch.dtype, device, seed: int) -> torch.nn.Linear:
    gen = torch.Generator(device=device).manual_seed(seed)
    lin = torch.nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=gen, device=device) * 0.02)
    lin.weight.requires_grad_(False)
    return lin


def _build(provider: Provider, base: torch.nn.Linear, r: int, seed: int, rho: float, noise: float):
    model = wrap_model(provider, _Holder(base), r=r, target_modules=["proj"])
    set_adapters(model, seed=seed, rho=rho, mag_noise=noise)
    return model


def _inputs(p: dict, dtype, device, seed: int, count: int):
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    xs = [torch.randn(p["T"], p["d_in"], generator=gen, device=device).to(dtype).requires_grad_(True)
          for _ in range(count)]
    dys = [torch.randn(p["T"], p["d_out"], generator=gen, device=device).to(dtype) for _ in range(count)]
    return xs, dys


def _grads(model, provider: Provider, x, dy, device, case: Case, cfg) -> dict[str, torch.Tensor]:
    """Output and gradients (x and every trainable parameter) of one forward+backward, train mode."""
    model.train()
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    zero_grads(list(params.values()), [x])
    with provider.active():
        with autocast(device, case.dtype, cfg.autocast):
            y = model(x)
        y.backward(dy)
    out = {"y": y.detach(), "dx": x.grad.detach().clone()}
    for n, p in params.items():
        out[_short(n)] = p.grad.detach().clone()
    zero_grads(list(params.values()), [x])
    return out


def _short(name: str) -> str:
    for key, short in (("lora_A", "dA"), ("lora_B", "dB"), ("lora_magnitude_vector", "dm")):
        if key in name:
            return short
    return name


def _check(case: Case, name: str, got: dict, ref: dict, rec) -> bool:
    """Record the correctness row (case ``check``); ``False`` when the provider must get no speed number."""
    case = case.sub("check")
    keys = [k for k in ref if k in got]
    worst_key, worst = max(((k, compare(got[k], ref[k])["rel_rms"]) for k in keys), key=lambda kv: kv[1])
    tol = TOLERANCE[case.dtype]
    if not worst <= tol:
        rec.fail(case, name, "correctness", "1", f"rel-RMS of {worst_key} vs the reference is {worst:.3g} > {tol:g}")
        return False
    rec.add(case, name, "correctness", worst, "1", note=f"worst rel-RMS over {','.join(keys)} vs the reference")
    return True


def _time_provider(case: Case, provider: Provider, model, params, xs, dys, ctx, repeats: int, warmup: int) -> None:
    """``fwd`` (eval, no_grad), ``fwd_bwd`` (params changed before every repeat) and ``fwd_bwd_accum``."""
    cfg, device, rec, name = ctx.cfg, ctx.device, ctx.rec, provider.name
    with provider.active():
        model.eval()
        with torch.no_grad(), autocast(device, case.dtype, cfg.autocast):
            stats = measure(lambda i: model(xs[i % len(xs)]), device=device, warmup=warmup, repeats=repeats)
        rec.add(case.sub("fwd"), name, "time", stats.median, "ms", spread=stats.spread(),
                note="inference: eval, no_grad")
        if provider.inference_only:
            rec.skip(case.sub("fwd_bwd"), name, "time", "ms",
                     "provider measured at inference only (its cache works in eval)")
            return
        model.train()

        def step(i):
            with autocast(device, case.dtype, cfg.autocast):
                y = model(xs[i % len(xs)])
            y.backward(dys[i % len(dys)])

        for phase, change in (("fwd_bwd", True), ("fwd_bwd_accum", False)):
            def before(i, change=change):
                if change:
                    perturb_(params)
                zero_grads(params, xs)

            stats = measure(step, device=device, warmup=warmup, repeats=repeats, before=before)
            note = ("adapter params changed in place before every repeat (outside timing)" if change
                    else "adapter params unchanged between repeats (inside an accumulation window)")
            rec.add(case.sub(phase), name, "time", stats.median, "ms", spread=stats.spread(), note=note)
        zero_grads(params, xs)
        if device.type == "cuda":
            _time_device(case, provider, model, params, xs, dys, ctx)


def _time_device(case: Case, provider: Provider, model, params, xs, dys, ctx) -> None:
    """``fwd_bwd_device`` / ``fwd_bwd_accum_device``: the GPU's busy time per step, the sum of the
    step's kernel (and memset/memcpy) durations from torch.profiler over ``len(xs)`` steps on the
    rotating inputs. The eager rows time one synchronised call, so a layer whose host work outlasts
    its kernels is timed by its host; these rows say what the same layer costs the GPU, which is
    what it costs where the host keeps ahead (large batches, a fast host, CUDA graphs). In
    ``fwd_bwd_device`` the adapter parameters move in place before every step (a fixed tiny step,
    ``p += 1e-6·noise``: one elementwise kernel per parameter, counted, the same for every provider),
    so every step pays its norm as after an optimizer step."""
    from torch.profiler import ProfilerActivity, profile

    cfg, device, rec, name = ctx.cfg, ctx.device, ctx.rec, provider.name
    noise = [torch.randn_like(p) for p in params]
    for phase, change in (("fwd_bwd_device", True), ("fwd_bwd_accum_device", False)):
        zero_grads(params, xs)
        try:
            with provider.active():
                model.train()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for i in range(len(xs)):
                        if change:
                            with torch.no_grad():
                                for p, e in zip(params, noise):
                                    p.add_(e, alpha=1e-6)
                        with autocast(device, case.dtype, cfg.autocast):
                            y = model(xs[i])
                        y.backward(dys[i])
                    torch.cuda.synchronize(device)
            busy_us = sum(e.self_device_time_total for e in prof.key_averages())
        except Exception as exc:  # noqa: BLE001 - a profiler failure loses these rows, not the suite
            busy_us, why = 0.0, f"{type(exc).__name__}: {exc}"
        else:
            why = "the profiler recorded no device activity"
        finally:
            zero_grads(params, xs)
        if busy_us <= 0:
            rec.fail(case.sub(phase), name, "time", "ms", why)
            continue
        rec.add(case.sub(phase), name, "time", busy_us / 1e3 / len(xs), "ms",
                note=f"device busy time (sum of kernel durations, torch.profiler) per step over {len(xs)} steps, "
                     "host excluded" + ("; adapter params moved in place before every step" if change else ""))


def run_layer(case: Case, ctx) -> None:
    cfg, device, rec = ctx.cfg, ctx.device, ctx.rec
    p, dtype = case.params, DTYPES[case.dtype]
    repeats, warmup = cfg.timing_for("layer")
    base = _base_linear(p["d_in"], p["d_out"], dtype, device, cfg.seed)
    count = rotation_count(p["T"] * (p["d_in"] + p["d_out"]) * dtype.itemsize, device)
    xs, dys = _inputs(p, dtype, device, cfg.seed, count)
    ref: Optional[dict] = None
    for provider, check_only in ctx.reference_first():
        name = provider.name
        if not provider.available:
            rec.skip(case.sub("fwd"), name, "time", "ms", provider.reason or "not available")
            continue
        model = _build(provider, base, p["r"], cfg.seed, RHO, MAG_NOISE)
        params = trainable(model)
        if provider.is_dora:
            got = _grads(model, provider, xs[0], dys[0], device, case, cfg)
            if name == "peft_ref":
                ref = got
                if check_only:
                    del model, params, got
                    release(device)
                    continue
            elif ref is not None and not _check(case, name, got, ref, rec):
                for phase in ("fwd", "fwd_bwd", "fwd_bwd_accum"):
                    rec.fail(case.sub(phase), name, "time", "ms", "failed the correctness check: no speed number")
                del model
                release(device)
                continue
            del got
        _time_provider(case, provider, model, params, xs, dys, ctx, repeats, warmup)
        del model, params
        release(device)
    del base, xs, dys
    release(device)


def _warm_up(model, provider: Provider, x, dy, device, case: Case, cfg) -> None:
    """One untimed inference forward and training step, so one-time work (Triton autotuning, lazy
    initialisation) allocates before memory is measured."""
    model.eval()
    with torch.no_grad(), autocast(device, case.dtype, cfg.autocast):
        model(x)
    if not provider.inference_only:
        model.train()
        with autocast(device, case.dtype, cfg.autocast):
            y = model(x)
        y.backward(dy)
        zero_grads(trainable(model), [x])


def run_memory(case: Case, ctx) -> None:
    cfg, device, rec = ctx.cfg, ctx.device, ctx.rec
    p, dtype = case.params, DTYPES[case.dtype]
    base = _base_linear(p["d_in"], p["d_out"], dtype, device, cfg.seed)
    xs, dys = _inputs(p, dtype, device, cfg.seed, 1)
    x, dy = xs[0], dys[0]
    for provider in ctx.providers:
        name = provider.name
        if not provider.available:
            rec.skip(case.sub("static"), name, "adapter_params", "bytes", provider.reason or "not available")
            continue
        model = _build(provider, base, p["r"], cfg.seed, RHO, MAG_NOISE)
        params = trainable(model)
        rec.add(case.sub("static"), name, "adapter_params", sum(t.numel() * t.element_size() for t in params),
                "bytes")
        phases: dict[str, Optional[int]] = {}
        with provider.active():
            before_any = allocated(device)
            _warm_up(model, provider, x, dy, device, case, cfg)
            model.eval()
            release(device)
            with torch.no_grad(), autocast(device, case.dtype, cfg.autocast), PeakMemory(device) as pm:
                model(x)
            phases["inference_fwd"] = pm.peak_extra
            if before_any is not None:
                rec.add(case.sub("static"), name, "resident_after_inference", allocated(device) - before_any, "bytes",
                        note="memory held after forwards (caches), above what the built model held")
            if not provider.inference_only:
                model.train()
                zero_grads(params, [x])
                release(device)
                with PeakMemory(device) as step_pm:
                    with PeakMemory(device) as fwd_pm, autocast(device, case.dtype, cfg.autocast):
                        y = model(x)
                    with PeakMemory(device) as bwd_pm:
                        y.backward(dy)
                    del y
                phases.update(train_fwd=fwd_pm.peak_extra, train_bwd=bwd_pm.peak_extra, train_step=step_pm.peak_extra)
                zero_grads(params, [x])
        for phase in ("inference_fwd", "train_fwd", "train_bwd", "train_step"):
            sub = case.sub(phase)
            if phase not in phases:
                rec.skip(sub, name, "peak_extra_mem", "bytes", "provider measured at inference only")
            elif phases[phase] is None:
                rec.skip(sub, name, "peak_extra_mem", "bytes", CPU_REASON)
            else:
                rec.add(sub, name, "peak_extra_mem", phases[phase], "bytes",
                        note="peak allocated above the phase's start")
        del model, params
        release(device)
    del base, xs, dys
    release(device)


def _truth(layer, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and gradients of ``y = (m/n) ⊙ (W x + s·B A x)`` in fp64 with ``n`` a constant."""
    adapter = "default"
    W = layer.get_base_layer().weight.detach().double()
    A = layer.lora_A[adapter].weight.detach().double().requires_grad_(True)
    B = layer.lora_B[adapter].weight.detach().double().requires_grad_(True)
    m = layer.lora_magnitude_vector[adapter].weight.detach().double().reshape(-1).requires_grad_(True)
    s = float(layer.scaling[adapter])
    x64 = x.detach().double().requires_grad_(True)
    n = exact_row_norm(W, A.detach(), B.detach(), s)
    y = (m / n) * (x64 @ W.T + s * (x64 @ A.T) @ B.T)
    y.backward(dy.double())
    return {"y": y.detach(), "dx": x64.grad, "dA": A.grad, "dB": B.grad, "dm": m.grad}


def run_stability(case: Case, ctx) -> None:
    cfg, device, rec = ctx.cfg, ctx.device, ctx.rec
    p, dtype = case.params, DTYPES[case.dtype]
    base = _base_linear(p["d_in"], p["d_out"], dtype, device, cfg.seed)
    xs, dys = _inputs(p, dtype, device, cfg.seed, 1)
    truth: Optional[dict] = None
    for provider in ctx.providers:
        name = provider.name
        if not provider.is_dora:
            continue
        if not provider.available:
            rec.skip(case, name, "y_rel_rms", "1", provider.reason or "not available")
            continue
        model = _build(provider, base, p["r"], cfg.seed, STAB_RHO, STAB_MAG_NOISE)
        if truth is None:
            truth = _truth(lora_layers(model)[0][1], xs[0], dys[0])
        got = _grads(model, provider, xs[0], dys[0], device, case, cfg)
        for key in ("y", "dx", "dA", "dB", "dm"):
            if key not in got:
                continue
            err = compare(got[key].reshape(truth[key].shape), truth[key])
            rec.add(case, name, f"{key}_rel_rms", err["rel_rms"], "1", note="vs fp64 evaluation of the same weights")
            rec.add(case, name, f"{key}_max_abs", err["max_abs"], "1")
        del model, got
        release(device)
    del base, xs, dys, truth
    release(device)
