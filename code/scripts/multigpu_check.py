#!/usr/bin/env python
"""DoRA under FSDP2 and DeepSpeed ZeRO-3 on 2 GPUs: loss and gradient agreement, per-GPU peak memory.

    torchrun --nproc_per_node 2 code/scripts/multigpu_check.py --out DIR     (via run_multigpu_check.sh)

A Llama-shaped model from its config with random weights (default ~1.1B parameters, bf16 compute;
``--dtype fp32`` for fp32 throughout), DoRA on every linear layer, one sequence per rank. Each
phase builds the model afresh, trains ``--steps`` steps (AdamW) and records: the loss before and
after the first step, the gradients of A, B and m after the first backward (gathered whole on
rank 0), peak and static allocated memory of every GPU, the time of the later steps, the dtypes of
the model's floating-point buffers, and how the DoRA norm met sharded parameters
(``dora_distributed.STATS``). Phases (the ``single*`` ones on one GPU: every rank runs its own
copy, no communication):

* ``single-*``: the whole model cast with ``.to(bf16)`` and the whole batch in one pass
  (``vs_single``). Not like for like with the engines: ``.to`` also rounds RoPE's ``inv_freq``
  buffer to bf16 (at position 2048 the angles move by up to ~4 rad), which FSDP2's
  ``param_dtype`` and DeepSpeed (>= 0.19.2) leave in fp32. On the CPU that, not the split batch
  nor the fp32 masters, is what moves the gradients, growing with depth: the likely cause of the
  ~0.22 relative L2 every engine showed against it on 2x H200 (results of 2a12c94);
* ``single-fp32buf-*``: as ``single-*`` but only the parameters cast (buffers stay fp32);
* ``single-split-*``: the like-for-like reference (``vs_single_split``): parameters cast to the
  compute dtype, buffers fp32, fp32 master copies of the adapters for AdamW, and the gradient the
  fp32 mean of per-sequence gradients (one forward and backward per sequence, as each rank runs);
* ``fsdp2-layer-*``: ``fully_shard`` per decoder layer plus the root, bf16 ``MixedPrecisionPolicy``;
* ``fsdp2-linear-*``: additionally every ``nn.Linear`` its own unit, so the norm meets sharded
  DTensors (upstream PEFT's DoRA cannot run this wrapping: its error is recorded); the norm then
  reads the fp32 shards, not the bf16 copy, so in bf16 it differs from ``single-split`` by bf16
  rounding (0.006 relative L2 on the CPU, tiny model) where the per-layer wrapping matches it;
* ``zero3-*``: DeepSpeed ZeRO-3, bf16, the same AdamW as a client optimizer.

With ``--dtype fp32`` the same phases run in fp32 (no mixed precision, no bf16 in DeepSpeed), where
every engine should match ``single-split`` to ~1e-6.

``ours`` is dorafactors (plugin), ``upstream`` the installed PEFT's own DoRA. Phases that set
``PEFT_FORCE_GATHER`` / ``PEFT_DORA_ALLOW_PARTIAL_GATHER`` record their effect. A failing phase is
recorded with its error and the run goes on; the JSON is rewritten after every phase.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

MODELS = {
    # Llama-shaped; "1b" is TinyLlama-1.1B's shape
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
}

# name: (engine, impl, wrapping, environment)
PHASES = {
    "single-ours": ("single", "ours", None, {}),
    "single-upstream": ("single", "upstream", None, {}),
    "single-split-ours": ("split", "ours", None, {}),
    "single-split-upstream": ("split", "upstream", None, {}),
    "single-fp32buf-ours": ("single", "ours", "params", {}),
    "fsdp2-layer-ours": ("fsdp2", "ours", "layer", {}),
    "fsdp2-layer-upstream": ("fsdp2", "upstream", "layer", {}),
    "fsdp2-layer-ours-force0": ("fsdp2", "ours", "layer", {"PEFT_FORCE_GATHER": "0"}),
    "fsdp2-layer-ours-force1": ("fsdp2", "ours", "layer", {"PEFT_FORCE_GATHER": "1"}),
    "fsdp2-layer-ours-partial": ("fsdp2", "ours", "layer", {"PEFT_DORA_ALLOW_PARTIAL_GATHER": "1"}),
    "fsdp2-linear-ours": ("fsdp2", "ours", "linear", {}),
    "fsdp2-linear-ours-partial": ("fsdp2", "ours", "linear", {"PEFT_DORA_ALLOW_PARTIAL_GATHER": "1"}),
    "fsdp2-linear-ours-force1": ("fsdp2", "ours", "linear", {"PEFT_FORCE_GATHER": "1"}),
    "zero3-ours": ("zero3", "ours", None, {}),
    "zero3-upstream": ("zero3", "upstream", None, {}),
    "zero3-ours-force0": ("zero3", "ours", None, {"PEFT_FORCE_GATHER": "0"}),
    "zero3-ours-force1": ("zero3", "ours", None, {"PEFT_FORCE_GATHER": "1"}),
    "zero3-ours-partial": ("zero3", "ours", None, {"PEFT_DORA_ALLOW_PARTIAL_GATHER": "1"}),
    "zero3-ours-force1-partial": ("zero3", "ours", None, {"PEFT_FORCE_GATHER": "1",
                                                          "PEFT_DORA_ALLOW_PARTIAL_GATHER": "1"}),
    # expected to fail, last: an error on one rank only could stall the other
    "fsdp2-linear-ours-force0": ("fsdp2", "ours", "linear", {"PEFT_FORCE_GATHER": "0"}),
    "fsdp2-linear-upstream": ("fsdp2", "upstream", "linear", {}),
}
ENV_NAMES = ("PEFT_FORCE_GATHER", "PEFT_DORA_ALLOW_PARTIAL_GATHER")
KINDS = ("lora_A", "lora_B", "lora_magnitude_vector")
NORMS: dict = {}  # the last phase's count of norm computations by our layers
BUFFERS: dict = {}  # the last phase's floating-point buffer dtypes (RoPE's inv_freq), as trained


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder (default $OUT or .)")
    p.add_argument("--model", choices=sorted(MODELS), default="1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=64, help="LoRA rank r")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--phases", default="all", help="comma-separated phase names or 'all'; see --list")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    args.compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.list:
        print("\n".join(PHASES))
        sys.exit(0)
    if args.phases != "all":
        unknown = [n for n in args.phases.split(",") if n not in PHASES]
        if unknown:
            p.error(f"--phases: unknown {unknown}; accepted: 'all' or names from --list")
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST"):
        if name not in os.environ:
            p.error(f"{name} must be set (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1); "
                    "run code/scripts/run_multigpu_check.sh")
    return args


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build(impl: str, args, dtype: torch.dtype, buffers: bool = True):
    """The DoRA Llama, every rank alike; cast with ``.to(dtype)`` (buffers too), or only its
    parameters when not ``buffers``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import dorafactors

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=args.seq, **MODELS[args.model])
    with torch.device(device()):
        model = LlamaForCausalLM(cfg)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", use_dora=True)
    with dorafactors.enabled(impl == "ours"):
        model = get_peft_model(model, config)
    # B = 0 would make every A gradient zero: give B small values (same on every rank and for both
    # implementations): ‖s·(BA)_i‖ ≈ 2σ·sqrt(r/3) ≈ 2% of ‖W_i‖ ≈ 0.9, DoRA's working regime
    gen = torch.Generator(device=device()).manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, device=p.device) * 0.002)
    if buffers:
        return model.to(dtype)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def batch(args, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randint(0, vocab, (2, args.seq), generator=gen).to(device())


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------------


def train(args, forward, backward, step, grads_fn):
    """``--steps`` steps; returns (losses, grads after the first backward, seconds per later step)."""
    losses, times, grads = [], [], None
    for it in range(args.steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = forward()
        backward(loss)
        if it == 0:
            grads = grads_fn()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if it:
            times.append(time.perf_counter() - t0)
        losses.append(loss.detach().float())
    return losses, grads, times


def _reset_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _peak():
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def run_single(impl, args, wrapping=None):
    model = build(impl, args, args.compute, buffers=wrapping != "params")
    ids = batch(args, model.config.vocab_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    static = _reset_memory()
    names = trainable_names(model)
    params = dict(model.named_parameters())
    _note_buffers(model)
    gen0 = _norm_generations(model)
    losses, grads, times = train(
        args, lambda: model(input_ids=ids, labels=ids).loss, lambda loss: loss.backward(),
        lambda: (opt.step(), opt.zero_grad(set_to_none=True)),
        lambda: {n: params[n].grad.float().cpu() for n in names})
    NORMS["computed"] = _norm_generations(model) - gen0
    _repeat_eval(model, lambda: model(input_ids=ids, labels=ids))
    return [l.item() for l in losses], grads, times, static, _peak()


def split_step(model, sequences, master: dict, opt=None):
    """One step as the ranks take it, on one device: a forward and backward per sequence, the
    gradients' fp32 mean (the ranks' reduce-scatter), then ``opt`` (if any) on the fp32 ``master``
    copies of the trainable parameters, copied back into them. Returns (mean loss, {name: fp32
    gradient})."""
    params = dict(model.named_parameters())
    grads, losses = {n: torch.zeros_like(m, dtype=torch.float32) for n, m in master.items()}, []
    for ids in sequences:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach().float())
        for n in master:
            grads[n] += params[n].grad.float() / len(sequences)
            params[n].grad = None
    if opt is not None:
        for n, m in master.items():
            m.grad = grads[n].clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, m in master.items():
                if m is not params[n]:
                    params[n].copy_(m)
    return torch.stack(losses).mean(), grads


def run_split(impl, args):
    """The like-for-like reference: parameters in the compute dtype, buffers fp32, fp32 master
    adapters and the mean of per-sequence gradients (``split_step``, the optimizer step inside)."""
    model = build(impl, args, args.compute, buffers=False)
    ids = batch(args, model.config.vocab_size)
    params = dict(model.named_parameters())
    master = {n: params[n] if params[n].dtype == torch.float32 else params[n].detach().float().clone()
              for n in trainable_names(model)}
    opt = torch.optim.AdamW(list(master.values()), lr=args.lr)
    static = _reset_memory()
    _note_buffers(model)
    gen0 = _norm_generations(model)
    last = {}

    def forward():
        loss, last["grads"] = split_step(model, [ids[i : i + 1] for i in range(ids.shape[0])], master, opt)
        return loss

    losses, grads, times = train(args, forward, lambda loss: None, lambda: None,
                                 lambda: {n: g.cpu() for n, g in last["grads"].items()})
    NORMS["computed"] = _norm_generations(model) - gen0
    _repeat_eval(model, lambda: model(input_ids=ids, labels=ids))
    return [l.item() for l in losses], grads, times, static, _peak()


def run_fsdp2(impl, wrapping, args, rank, world):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = build(impl, args, torch.float32)  # fp32 sharded master, bf16 (--dtype) compute
    mp = MixedPrecisionPolicy(param_dtype=args.compute, reduce_dtype=torch.float32)
    if wrapping == "linear":
        for module in list(model.modules()):
            if type(module) is torch.nn.Linear:
                fully_shard(module, mp_policy=mp)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    ids = batch(args, model.config.vocab_size)[rank : rank + 1]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    static = _reset_memory()
    names = trainable_names(model)
    params = dict(model.named_parameters())

    def grads():
        out = {}
        for n in names:
            full = params[n].grad.full_tensor().float()
            if rank == 0:
                out[n] = full.cpu()
        return out

    _note_buffers(model)
    gen0 = _norm_generations(model)
    losses, grads_, times = train(
        args, lambda: model(input_ids=ids, labels=ids).loss, lambda loss: loss.backward(),
        lambda: (opt.step(), opt.zero_grad(set_to_none=True)), grads)
    NORMS["computed"] = _norm_generations(model) - gen0
    _repeat_eval(model, lambda: model(input_ids=ids, labels=ids))
    return _mean_losses(losses, world), grads_, times, static, _peak()


def run_zero3(impl, args, rank, world):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    model = build(impl, args, torch.float32)
    names = trainable_names(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "bf16": {"enabled": args.dtype == "bf16"}, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    ids = batch(args, model.config.vocab_size)[rank : rank + 1]
    static = _reset_memory()
    params = dict(engine.module.named_parameters())

    def grads():
        out = {}
        for n in names:
            full = safe_get_full_grad(params[n]).float()
            if rank == 0:
                out[n] = full.cpu()
        return out

    _note_buffers(engine.module)
    gen0 = _norm_generations(model)
    losses, grads_, times = train(
        args, lambda: engine(input_ids=ids, labels=ids).loss, engine.backward, engine.step, grads)
    NORMS["computed"] = _norm_generations(model) - gen0
    _repeat_eval(model, lambda: engine(input_ids=ids, labels=ids))
    out = (_mean_losses(losses, world), grads_, times, static, _peak())
    if hasattr(engine, "destroy"):
        engine.destroy()
    return out


class _FusedCounter:
    """Counts calls of the fused composes (``dora_fused.compose_trusted`` and, where it exists,
    ``dora_fused_linear.compose_lora_b_trusted``; the layer looks both up at call time)."""

    def __init__(self):
        import importlib

        self.calls, self.saved = 0, []
        for module_name, attr in (("dorafactors.dora_fused", "compose_trusted"),
                                  ("dorafactors.dora_fused_linear", "compose_lora_b_trusted")):
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            original = getattr(module, attr, None)
            if original is None:
                continue
            self.saved.append((module, attr, original))
            setattr(module, attr, self._counted(original))

    def _counted(self, fn):
        def counted(*a, **k):
            self.calls += 1
            return fn(*a, **k)

        return counted

    def close(self):
        for module, attr, original in self.saved:
            setattr(module, attr, original)


def _repeat_eval(model, forward) -> None:
    """Two no-grad forwards on unchanged weights: the second must reuse every cached norm."""
    with torch.no_grad():
        forward()
        before = _norm_generations(model)
        forward()
        NORMS["recomputed_in_repeat_eval"] = _norm_generations(model) - before


def _note_buffers(model) -> None:
    """The dtypes of the model's floating-point buffers as it trains (RoPE's ``inv_freq``)."""
    BUFFERS.update({n: str(b.dtype).replace("torch.", "") for n, b in model.named_buffers()
                    if b.is_floating_point()})


def _norm_generations(model) -> int:
    """Norm-cache refills and clears of our layers (each refill is a norm computation)."""
    return sum(getattr(getattr(m, "_norm_cache", None), "generation", 0) for m in model.modules())


def _mean_losses(losses, world):
    t = torch.stack(losses).to(device())
    dist.all_reduce(t)
    return (t / world).tolist()


# ---------------------------------------------------------------------------------------------
# comparison and report
# ---------------------------------------------------------------------------------------------


def agreement(grads, ref) -> dict:
    """Per kind (A, B, m): relative L2 error and cosine of the concatenated gradients."""
    out = {}
    for kind in KINDS:
        names = [n for n in ref if kind in n]
        if not names or any(n not in grads for n in names):
            continue
        a = torch.cat([grads[n].reshape(-1).double() for n in names])
        b = torch.cat([ref[n].reshape(-1).double() for n in names])
        out[kind] = {"rel_l2": ((a - b).norm() / b.norm().clamp_min(1e-30)).item(),
                     "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item()}
    return out


def compare(entry, engine, wrapping, impl, losses, grads, refs) -> None:
    """Loss and gradient agreement with the one-GPU references that have run: ``single`` (suffix
    ``""``, the old fields) and ``split`` (``_split``, like for like); a reference phase records
    itself in ``refs``."""
    own = {("single", None): "single", ("split", None): "split"}.get((engine, wrapping))
    for ref_kind, suffix in (("single", ""), ("split", "_split")):
        ref = refs[ref_kind]
        if ref_kind == own:
            continue
        if impl in ref:
            entry[f"loss0_minus_single{suffix}"] = losses[0] - ref[impl][0][0]
            entry[f"vs_single{suffix}"] = agreement(grads, ref[impl][1])
        if engine not in ("single", "split") and "upstream" in ref:
            entry[f"vs_upstream_single{suffix}"] = agreement(grads, ref["upstream"][1])
    if own:
        refs[own][impl] = (losses, grads)
        if impl == "upstream" and "ours" in refs[own]:  # ours vs upstream on one GPU: the implementations' floor
            key = "bf16_floor_ours_vs_upstream_single" if own == "single" else "floor_ours_vs_upstream_single_split"
            entry[key] = agreement(refs[own]["ours"][1], grads)


def versions() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("peft", "transformers", "accelerate", "deepspeed", "triton"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            info[name] = f"not importable: {type(exc).__name__}"
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    info["gpu_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return info


def summary_table(report: dict) -> str:
    gib = 2**30
    rows = ["| phase | loss0 | loss1 | Δloss0 vs single | rel L2 grad A / B / m vs single | "
            "Δloss0 vs single-split | rel L2 grad A / B / m vs single-split (like for like) | buffers | "
            "peak GiB per GPU | static GiB | step s | norm: gathers (full/partial/none/cache hits) | "
            "norms computed (repeat eval) | "
            "fused composes | error |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def rel(vs):
        return " / ".join(f"{vs[k]['rel_l2']:.2e}" if k in vs else "-" for k in KINDS)

    def delta(d):
        return "" if d is None else f"{d:+.2e}"

    for name, ph in report["phases"].items():
        if "error" in ph:
            rows.append(f"| {name} | | | | | | | | | | | | | | {ph['error'][:140]} |")
            continue
        d0 = ph.get("loss0_minus_single")
        buffers = "/".join(sorted(set(ph.get("buffer_dtypes", {}).values()))) or "-"
        st = ph.get("norm_stats", {})
        gathers = f"{st.get('gather_full', 0)}/{st.get('gather_partial', 0)}/{st.get('materialized', 0)}/" \
                  f"{st.get('cache_hit', 0)}"
        rows.append(
            f"| {name} | {ph['losses'][0]:.5f} | {ph['losses'][1] if len(ph['losses']) > 1 else float('nan'):.5f} | "
            f"{delta(d0)} | {rel(ph.get('vs_single', {}))} | {delta(ph.get('loss0_minus_single_split'))} | "
            f"{rel(ph.get('vs_single_split', {}))} | {buffers} | "
            f"{' / '.join(f'{m / gib:.2f}' for m in ph['peak_bytes'])} | "
            f"{' / '.join(f'{m / gib:.2f}' for m in ph['static_bytes'])} | "
            f"{(sum(ph['step_s']) / len(ph['step_s'])) if ph['step_s'] else float('nan'):.3f} | {gathers} | "
            f"{ph.get('norms_computed')} ({ph.get('norms_recomputed_in_repeat_eval')}) | "
            f"{ph.get('fused_compose_calls')} | |")
    return "\n".join(rows)


def memory_table(report: dict) -> str:
    """Per engine and wrapping: our peak memory per GPU against upstream's under the same settings."""
    gib = 2**30
    rows = ["| engine | ours peak GiB per GPU | upstream peak GiB per GPU | ours / upstream (max over GPUs) |",
            "|---|---|---|---|"]
    for ours_name, ph in report["phases"].items():
        if ph.get("impl") != "ours" or ph.get("env") or "error" in ph:
            continue
        up = report["phases"].get(ours_name.replace("-ours", "-upstream"), {})
        if "peak_bytes" not in up:
            continue
        ratio = f"{max(ph['peak_bytes']) / max(up['peak_bytes']):.3f}" if max(up["peak_bytes"]) else "n/a"
        label = ours_name.replace("-ours", "")
        rows.append(f"| {label} | {' / '.join(f'{m / gib:.2f}' for m in ph['peak_bytes'])} | "
                    f"{' / '.join(f'{m / gib:.2f}' for m in up['peak_bytes'])} | {ratio} |")
    return "\n".join(rows)


def markdown(report: dict, world: int) -> str:
    try:
        return _markdown(report, world)
    except Exception as exc:  # noqa: BLE001 - the JSON is the record; the table must not end the run
        return f"(table failed: {type(exc).__name__}: {exc}; see multigpu_check.json)\n"


def _markdown(report: dict, world: int) -> str:
    return (f"# DoRA under FSDP2 and ZeRO-3 ({report['versions']['gpu']} x{world}, {report.get('dtype', 'bf16')})\n\n"
            f"versions: {json.dumps(report['versions'])}\n\nmodel: {json.dumps(report['model'])}\n\n"
            f"{summary_table(report)}\n\n## Peak memory, ours vs upstream\n\n{memory_table(report)}\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=240))
    import dorafactors
    from dorafactors import dora_distributed

    names = list(PHASES) if args.phases == "all" else args.phases.split(",")
    report = {"script": "code/scripts/multigpu_check.py", "argv": sys.argv[1:], "world_size": world,
              "model": {"name": args.model, **MODELS[args.model], "seq": args.seq, "lora_rank": args.rank,
                        "dora_on": "all-linear", "batch": "1 sequence per rank, 2 on the single GPU "
                        "(single-split: one at a time)"},
              "dtype": args.dtype, "optimizer": f"AdamW lr={args.lr}", "steps": args.steps, "versions": versions(),
              "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
              "phases": {}}
    refs = {"single": {}, "split": {}}  # whole-model cast, whole batch / like for like: {impl: (losses, grads)}
    json_path = out_dir / "multigpu_check.json"
    for name in names:
        engine, impl, wrapping, env = PHASES[name]
        for var in ENV_NAMES:
            os.environ.pop(var, None)
        os.environ.update(env)
        dora_distributed.reset_stats()
        dorafactors.disable()
        t0 = time.perf_counter()
        entry = {"engine": engine, "impl": impl, "wrapping": wrapping, "env": env}
        NORMS.clear()
        BUFFERS.clear()
        fused = _FusedCounter()
        try:
            if engine == "single":
                losses, grads, times, static, peak = run_single(impl, args, wrapping)
            elif engine == "split":
                losses, grads, times, static, peak = run_split(impl, args)
            elif engine == "fsdp2":
                losses, grads, times, static, peak = run_fsdp2(impl, wrapping, args, rank, world)
            else:
                losses, grads, times, static, peak = run_zero3(impl, args, rank, world)
            peaks = [None] * world
            statics = [None] * world
            dist.all_gather_object(peaks, peak)
            dist.all_gather_object(statics, static)
            entry.update(losses=losses, step_s=times, peak_bytes=peaks, static_bytes=statics,
                         norm_stats=dict(dora_distributed.STATS), norms_computed=NORMS.get("computed"),
                         norms_recomputed_in_repeat_eval=NORMS.get("recomputed_in_repeat_eval"),
                         fused_compose_calls=fused.calls, buffer_dtypes=dict(BUFFERS))
            if rank == 0:
                compare(entry, engine, wrapping, impl, losses, grads, refs)
            del grads
        except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            entry["traceback"] = traceback.format_exc()[-4000:]
        finally:
            fused.close()
        entry["wall_s"] = time.perf_counter() - t0
        report["phases"][name] = entry
        _reset_memory()
        if rank == 0:  # rewritten after every phase: a run cut short keeps what it measured
            json_path.write_text(json.dumps(report, indent=1, default=str))
            (out_dir / "multigpu_check.md").write_text(markdown(report, world))
            print(f"[{name}] {'ERROR ' + entry['error'][:300] if 'error' in entry else 'ok'} "
                  f"({entry['wall_s']:.1f} s)", flush=True)
        dist.barrier()
    if rank == 0:
        print(markdown(report, world))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
