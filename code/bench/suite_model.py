"""The model suite: DESIGN.md's six language models, every decoder linear adapted, side by side.

Per model (and rank, dtype) one base model is built with random weights and reused: each provider
wraps it with PEFT, gets the same deterministic adapter values, is measured, and is unloaded again
(``unload()``, no merge), so every provider runs on the very same weights.

- ``counts``: DoRA modules and trainable parameters, against DESIGN.md's table at full depth and
  r = 384 (elsewhere against the count of the target linears of the model built).
- ``inference``: one forward (eval, no_grad, autocast) of ``batch × seqlen`` tokens; logits of the
  last ``loss_tokens`` positions only (``logits_to_keep``), no KV cache.
- ``gradient``: one accumulation window of ``grad_accum`` micro-batches, each forward (autocast) and
  backward of cross-entropy on the last ``loss_tokens`` tokens, gradient checkpointing on by
  default. No optimizer in the timed region; between windows, outside it, every adapter parameter
  changes in place (``p += 1e-4·ε``) as an optimizer step would, so a norm cache pays its
  recompute once per window, as in real training. The embedding output requires grad for every
  provider (``enable_input_require_grads``) so the frozen base has a backward too.
- ``fidelity``: final logits against an fp32 run of the same weights, on a model that is not
  chaotic: the first ``--fidelity-layers`` (2) decoder layers of the same architecture and
  dimensions with transformers' initialisation, adapters non-trivial (``‖s·B·A‖ = 0.05·‖W‖``,
  ``m = n·(1 + 0.01·ε)``; a hybrid model keeps at least 4 layers, so one full-attention layer is in).
  The DoRA truth is the reference run in fp32 (TF32 off); LoRA and the
  base are compared with their own fp32 runs. A DoRA provider whose logits differ from the
  reference's (same dtype) by more than the dtype's tolerance fails and gets no speed number.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .common import DTYPES, TOLERANCE, Case, autocast, compare, perturb_, set_adapters, trainable, zero_grads
from .memory import CPU_REASON, PeakMemory, allocated, release
from .models import (MODELS, analytic_counts, build_config, build_model, dense_twin, dora_counts, enable_checkpointing,
                     quantize_targets)
from .providers import Provider, wrap_model
from .timing import measure

__all__ = ["plan_model", "run_model"]

RHO, MAG_NOISE = 0.05, 0.01
# PEFT reads the deprecated alias; nothing for the benchmark to act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def plan_model(cfg) -> list[Case]:
    cases = []
    for dtype in cfg.dtypes:
        for name in cfg.models:
            spec = MODELS[name]
            _config, depth, _reason = build_config(spec, layers=cfg.layers, smoke=cfg.profile == "smoke")
            full = int((spec.smoke_dims if cfg.profile == "smoke" else spec.dims)["num_hidden_layers"])
            for r in cfg.ranks_for("model"):
                params = {
                    "model": name, "layers": depth or (cfg.layers or full), "full_layers": full, "r": r,
                    "batch": cfg.batch, "seqlen": cfg.seqlen, "grad_accum": cfg.grad_accum,
                    "loss_tokens": cfg.loss_tokens, "gradient_checkpointing": cfg.gradient_checkpointing,
                }
                if cfg.quant != "none":
                    params["quant"] = cfg.quant  # bitsandbytes base weights: QLoRA vs QDoRA
                cases.append(Case("model", name, params, dtype))
    return cases


def _unwrap(provider: Provider, model):
    if provider.kind == "base":
        return model
    base = model.unload()
    if hasattr(base, "peft_config"):  # unload() leaves it; a later get_peft_model would warn about it
        del base.peft_config
    return base


def _batches(config, cfg, device, count: int):
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 7)
    vocab = config.vocab_size
    return [(torch.randint(0, vocab, (cfg.batch, cfg.seqlen), generator=gen, device=device),
             torch.randint(0, vocab, (cfg.batch, cfg.loss_tokens), generator=gen, device=device))
            for _ in range(count)]


def _forward(model, ids, cfg):
    return model(input_ids=ids, logits_to_keep=cfg.loss_tokens, use_cache=False).logits


# ---------------------------------------------------------------------------------------------
# fidelity
# ---------------------------------------------------------------------------------------------


def _logits(provider: Provider, base, r: int, targets, ids, cfg, device, dtype_name: str, *, amp: bool):
    model = wrap_model(provider, base, r=r, target_modules=list(targets))
    set_adapters(model, seed=cfg.seed, rho=RHO, mag_noise=MAG_NOISE)
    model.eval()
    with provider.active(), torch.no_grad(), autocast(device, dtype_name, amp):
        logits = _forward(model, ids, cfg).detach().float()
    _unwrap(provider, model)
    return logits


def run_fidelity(case: Case, ctx, spec) -> dict[str, str]:
    """Fidelity rows; returns the DoRA providers that failed (name -> reason)."""
    cfg, device, rec = ctx.cfg, ctx.device, ctx.rec
    sub = case.sub("fidelity")
    smoke = cfg.profile == "smoke"
    # a hybrid model needs four layers before its first full-attention layer appears
    layers = max(cfg.fidelity_layers, 4) if spec.hybrid else cfg.fidelity_layers
    config, depth, reason = build_config(spec, layers=layers, smoke=smoke)
    shape = dict(case.params, layers=depth)
    if config is None:
        rec.skip(sub, "all", "logits_rel_rms_vs_fp32", "1", reason, shape=shape)
        return {}
    r = case.params["r"]
    base = build_model(config, device=device, dtype=DTYPES[case.dtype], seed=cfg.seed)
    if cfg.quant != "none":
        quantize_targets(base, spec.targets, cfg.quant, device)
    for prm in base.parameters():
        prm.requires_grad_(False)
    ids = _batches(config, cfg, device, 1)[0][0]
    by_name = {p.name: p for p in (ctx.every or ctx.providers)}  # the truth need not be a selected provider
    truth_provider = next((p for p in (by_name.get("peft_ref"), by_name.get("ours_eager")) if p and p.available), None)
    # a quantized model's truth: the same dequantized values in dense fp32 layers
    base32 = dense_twin(base, torch.float32) if cfg.quant != "none" else copy.deepcopy(base).float()
    truths: dict[str, torch.Tensor] = {}
    if truth_provider is not None:
        truths["dora"] = _logits(truth_provider, base32, r, spec.targets, ids, cfg, device, "fp32", amp=False)
    lora = by_name.get("lora")
    if lora is not None and any(p.kind == "lora" for p in ctx.providers):
        truths["lora"] = _logits(lora, base32, r, spec.targets, ids, cfg, device, "fp32", amp=False)
    with torch.no_grad():
        truths["base"] = _forward(base32, ids, cfg).detach().float()
    del base32
    release(device)
    if "dora" in truths:
        effect = compare(truths["dora"], truths["base"])["rel_rms"]
        rec.add(sub, "fp32_truth", "adapter_effect_rel_rms", effect, "1", shape=shape,
                note=f"DoRA fp32 logits ({truth_provider.name}) vs the base's: how much the adapters matter")
    failed: dict[str, str] = {}
    ref_logits: Optional[torch.Tensor] = None
    for provider, check_only in ctx.reference_first():
        name = provider.name
        if check_only:  # the reference's bf16 logits only to check the others against
            ref_logits = _logits(provider, base, r, spec.targets, ids, cfg, device, case.dtype, amp=cfg.autocast)
            continue
        if not provider.available:
            rec.skip(sub, name, "logits_rel_rms_vs_fp32", "1", provider.reason or "not available", shape=shape)
            continue
        family = "dora" if provider.is_dora else provider.kind
        if family not in truths:
            rec.skip(sub, name, "logits_rel_rms_vs_fp32", "1", "no fp32 truth for this family", shape=shape)
            continue
        if provider.kind == "base":
            with torch.no_grad(), autocast(device, case.dtype, cfg.autocast):
                logits = _forward(base, ids, cfg).detach().float()
        else:
            logits = _logits(provider, base, r, spec.targets, ids, cfg, device, case.dtype, amp=cfg.autocast)
        err = compare(logits, truths[family])
        note = f"vs an fp32 run of the same weights ({depth} decoder layers)"
        rec.add(sub, name, "logits_cosine_vs_fp32", err["cosine"], "1", shape=shape, note=note)
        rec.add(sub, name, "logits_max_abs_vs_fp32", err["max_abs"], "1", shape=shape)
        rec.add(sub, name, "logits_rel_rms_vs_fp32", err["rel_rms"], "1", shape=shape)
        if provider.is_dora:
            if name == "peft_ref":
                ref_logits = logits
            elif ref_logits is not None:
                diff = compare(logits, ref_logits)["rel_rms"]
                if not diff <= TOLERANCE[case.dtype]:
                    failed[name] = (f"logits differ from the reference's by rel-RMS {diff:.3g} > "
                                    f"{TOLERANCE[case.dtype]:g}")
                    rec.fail(sub, name, "correctness", "1", failed[name], shape=shape)
                else:
                    rec.add(sub, name, "correctness", diff, "1", shape=shape, note="logits rel-RMS vs the reference")
            if err["finite"] == 0.0:
                failed[name] = "non-finite logits"
    del base, truths, ref_logits
    release(device)
    return failed


# ---------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------


def _check_counts(sub: Case, provider: Provider, model, base_counts, cfg, spec, rec) -> None:
    p = sub.params
    full = p["layers"] == p["full_layers"] and cfg.profile != "smoke" and p["r"] == 384
    expected = (spec.expected_modules, spec.expected_trainable) if full else base_counts
    source = "DESIGN.md's table (full depth, r=384)" if full else "the target linears of the model built"
    got = dora_counts(model)
    for metric, g, e in (("dora_modules", got[0], expected[0]), ("trainable_params", got[1], expected[1])):
        if g == e:
            rec.add(sub, provider.name, metric, g, "count", note=f"matches {source}")
        else:
            rec.add(sub, provider.name, metric, g, "count", status="failed", note=f"expected {e} from {source}")


def run_model(case: Case, ctx) -> None:
    cfg, device, rec = ctx.cfg, ctx.device, ctx.rec
    spec = MODELS[case.params["model"]]
    config, depth, reason = build_config(spec, layers=cfg.layers, smoke=cfg.profile == "smoke")
    if config is None:
        for phase in ("inference", "gradient"):
            rec.skip(case.sub(phase), "all", "time", "ms", reason)
        return
    failed = run_fidelity(case, ctx, spec) if cfg.fidelity_layers > 0 else {}
    repeats, warmup = cfg.timing_for("model")
    dtype = DTYPES[case.dtype]
    r, ga = case.params["r"], cfg.grad_accum
    base = build_model(config, device=device, dtype=dtype, seed=cfg.seed)
    if cfg.quant != "none":
        quantize_targets(base, spec.targets, cfg.quant, device)
        release(device)
    for prm in base.parameters():
        prm.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(base)
    base.enable_input_require_grads()
    base_counts = analytic_counts(base, spec.targets, r)
    batches = _batches(config, cfg, device, max(2, 2 * ga))
    static = allocated(device)
    counts, inf, grad = case.sub("counts"), case.sub("inference"), case.sub("gradient")
    if static is not None:
        rec.add(counts, "base", "static_model", static, "bytes", note="allocated: base model and inputs")
    checked = False
    for provider in ctx.providers:
        name = provider.name
        if not provider.available:
            for sub in (inf, grad):
                rec.skip(sub, name, "time", "ms", provider.reason or "not available")
            continue
        if name in failed:
            for sub in (inf, grad):
                rec.fail(sub, name, "time", "ms", f"failed the fidelity check ({failed[name]}): no speed number")
            continue
        model = wrap_model(provider, base, r=r, target_modules=list(spec.targets))
        try:
            set_adapters(model, seed=cfg.seed, rho=RHO, mag_noise=MAG_NOISE)
            params = trainable(model)
            if provider.kind != "base":
                rec.add(counts, name, "adapter_params", sum(t.numel() * t.element_size() for t in params), "bytes")
            if provider.is_dora and not checked:
                _check_counts(counts, provider, model, base_counts, cfg, spec, rec)
                checked = True
            _measure_provider(provider, model, params, batches, inf, grad, ctx, repeats, warmup)
        finally:
            base = _unwrap(provider, model)
            del model
            release(device)
    del base, batches
    release(device)


def _measure_provider(provider, model, params, batches, inf: Case, grad: Case, ctx, repeats, warmup) -> None:
    """Inference then gradient timing; each phase's peak memory is taken over its timed repeats
    (after warm-up: one-time autotuning does not count), above what was allocated when they began
    (the gradients of a window are allocated inside it, so they count)."""
    cfg, device, rec = ctx.cfg, ctx.device, ctx.rec
    name, ga, dtype_name = provider.name, cfg.grad_accum, inf.dtype
    with provider.active():
        model.eval()
        release(device)
        with torch.no_grad(), autocast(device, dtype_name, cfg.autocast), PeakMemory(device) as pm:
            logits = _forward(model, batches[0][0], cfg)
            finite = bool(torch.isfinite(logits).all())
            del logits
            if finite:
                stats = measure(lambda i: _forward(model, batches[i % len(batches)][0], cfg), device=device,
                                warmup=warmup, repeats=repeats, on_first_timed=pm.restart)
        if not finite:
            for sub in (inf, grad):
                rec.fail(sub, name, "time", "ms", "non-finite logits: no speed number")
            return
        rec.add(inf, name, "time", stats.median, "ms", spread=stats.spread(),
                note="one forward, eval, no_grad; logits of the last loss_tokens positions")
        _memory_row(inf, name, pm, rec)
        if pm.start is not None:
            rec.add(inf, name, "resident_after_inference", allocated(device) - pm.start, "bytes",
                    note="memory still held after the inference forwards (caches), above the phase's start")
        if provider.inference_only:
            rec.skip(grad, name, "time", "ms", "the installed PEFT's cache is off in training mode; see peft_installed")
            return
        model.train()

        def window(i):
            for k in range(ga):
                ids, labels = batches[(i * ga + k) % len(batches)]
                with autocast(device, dtype_name, cfg.autocast):
                    logits = _forward(model, ids, cfg)
                    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)) / ga
                loss.backward()

        def between_windows(i):
            perturb_(params)  # an optimizer step's in-place change, outside the timed region

        zero_grads(params)
        release(device)
        with PeakMemory(device) as pm:
            stats = measure(window, device=device, warmup=warmup, repeats=repeats, before=between_windows,
                            on_first_timed=pm.restart)
        zero_grads(params)
        rec.add(grad, name, "time", stats.median, "ms", spread=stats.spread(),
                note=f"one accumulation window of {ga} micro-batches; params changed in place between windows")
        _memory_row(grad, name, pm, rec)


def _memory_row(sub: Case, name: str, pm: PeakMemory, rec) -> None:
    if pm.peak_extra is None:
        rec.skip(sub, name, "peak_extra_mem", "bytes", CPU_REASON)
    else:
        rec.add(sub, name, "peak_extra_mem", pm.peak_extra, "bytes", note="peak allocated above the static footprint")
