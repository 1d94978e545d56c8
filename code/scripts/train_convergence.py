#!/usr/bin/env python
"""Training-convergence study: DoRA fine-tuning with dorafactors' eager vs fused path, several seeds.

Nothing can be downloaded where this runs, so the whole pipeline is built offline:

1. Corpus: the ``.py`` files of this Python's standard library (``sysconfig`` ``stdlib`` path,
   ``site-packages`` excluded, files read in sorted order), tokenized as raw bytes (vocab 256).
   * pretrain slice: library source (every file outside the test suite);
   * fine-tune slice: the stdlib test suite (``test/``, ``tests/``, ``test_*.py``), a
     different distribution of code;
   * eval slice: test-suite files held out of fine-tuning (``crc32(relative path) % 10 == 0``).
   Where a Python ships without its test suite the fine-tune/eval slices are whole top-level
   packages chosen by ``crc32(name)`` instead (``corpus.split`` in the summary says which).
2. Base model: a small Llama-style decoder built from a ``transformers`` config with random
   init, pre-trained briefly on the pretrain slice (fp32 weights, bf16 autocast), saved once
   (``--pretrained-dir``, default a temp dir) and reused by every fine-tuning run.
3. Fine-tuning: DoRA on every linear layer (``target_modules="all-linear"``, ``r >= 256``) with
   ``dorafactors.enable()``; the implementation is chosen by ``PEFT_DORA_FUSED`` (0: eager
   PyTorch, 1: the Triton kernels, an error if they cannot run). Precision as users train
   (DESIGN.md): bf16 base model, PEFT's default fp32 adapter weights, ``torch.autocast(bf16)``.
   AdamW, linear warm-up then cosine decay, gradient accumulation, gradient clipping. For one
   seed, eager and fused see the same adapter init and the same batches in the same order.
   ``--magnitude-init exact`` starts ``m`` at the fp32 norm of the bf16 weights (``g = 1``);
   ``peft`` (default, what users get) starts it at the bf16-rounded norm, see ``dora_model``.
4. Diagnostics: an init check (eager vs fused on the same weights before any update), an fp32
   control, an eager rerun and an eager run with ``lora_A`` off by a rounding-sized amount.

Runs are ordered seed by seed (eager then fused), and the summary JSON is rewritten after every
completed pair, so a run cut short still leaves complete pairs behind.

Output layout (what ``paper/generate_training_figure.py`` reads)::

    <out-dir>/pretrain/                                 pretraining loss
    <out-dir>/bf16/{eager,fused}_seed<k>/               train/loss every optimizer step,
                                                        eval/loss every --eval-every steps
    <out-dir>/fp32_control/{eager,fused}_seed<k>/       with --fp32-control-seeds N
    <out-dir>/controls/eager_rerun_seed<k>/             with --rerun-control
    <out-dir>/controls/eager_ulp_seed<k>/               with --ulp-control (A x (1 + 2^-16))

Usage::

    python code/scripts/train_convergence.py --out-dir code/convergence_runs \\
        --summary code/convergence_runs/summary.json [--seeds 0 1 2] [--steps 1000] ...
    python code/scripts/train_convergence.py --smoke --out-dir /tmp/conv --summary /tmp/conv.json
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import tempfile
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
# the checkout's library, whether or not (or wherever) dorafactors is pip-installed
sys.path.insert(0, os.path.join(ROOT, "src"))
# deterministic cuBLAS needs this before CUDA initializes
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without CUDA the fused path runs Triton's CPU interpreter, which must be chosen before
    # triton.language is first imported (transformers and peft may import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm ships with transformers
    tqdm = None

TRAIN_TAG, EVAL_TAG = "train/loss", "eval/loss"
EARLY_STEPS = 100  # "first 100 steps vs the rest" in the summary
# --ulp-control scales lora_A by 1 + 2^-16: under bf16 autocast ~1/256 of A's elements then round
# one bf16 ulp differently, a rounding-sized change of the size eager vs fused kernels make
ULP_PERTURB = 2.0 ** -16

# name -> model and schedule; every field can be overridden from the command line
PRESETS = {
    "small": dict(hidden=512, inter=1408, layers=6, heads=8, kv_heads=4, seq=512, batch=16,
                  pretrain_steps=600, pretrain_lr=2e-3, steps=1000, grad_accum=4, lr=3e-4,
                  rank=256, alpha=512, eval_every=50, eval_batches=4, seeds=[0, 1, 2],
                  attn="eager"),
    # tiny: on the CPU the fused path runs Triton's interpreter, ~1 s per training step here
    "smoke": dict(hidden=32, inter=64, layers=1, heads=4, kv_heads=2, seq=32, batch=2,
                  pretrain_steps=20, pretrain_lr=3e-3, steps=6, grad_accum=2, lr=1e-3,
                  rank=8, alpha=16, eval_every=3, eval_batches=1, seeds=[0, 1], attn="eager"),
}


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------

def _is_test_file(rel: str) -> bool:
    parts = rel.split(os.sep)
    return any(p in ("test", "tests") for p in parts[:-1]) or parts[-1].startswith("test_")


def load_corpus(max_bytes: int | None = None, min_finetune_bytes: int = 1 << 20) -> dict:
    """Byte streams of the three slices of the stdlib's .py files, plus what went into them."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if rel.split(os.sep)[0] in ("site-packages", "dist-packages") or not os.path.isfile(path):
            continue
        files.append(rel)
    slices = {"pretrain": [], "finetune": [], "eval": []}
    tests = [f for f in files if _is_test_file(f)]
    test_bytes = sum(os.path.getsize(os.path.join(root, f)) for f in tests)
    if test_bytes >= min_finetune_bytes:
        split = "test-suite"
        for f in files:
            if not _is_test_file(f):
                slices["pretrain"].append(f)
            else:
                slices["eval" if zlib.crc32(f.encode()) % 10 == 0 else "finetune"].append(f)
    else:  # a Python without its test suite: split by top-level package instead
        split = "packages"
        for f in files:
            top = f.split(os.sep)[0]
            h = zlib.crc32(top.encode()) % 10
            slices["pretrain" if h < 5 else "eval" if h == 9 else "finetune"].append(f)
    out = {"root": root, "split": split, "python": platform.python_version()}
    for name, names in slices.items():
        buf = bytearray()
        for f in names:
            with open(os.path.join(root, f), "rb") as fh:
                buf += fh.read() + b"\n\n"
            if max_bytes and len(buf) >= max_bytes:
                buf = buf[:max_bytes]
                break
        out[name] = torch.frombuffer(buf, dtype=torch.uint8).clone()  # buf is a writable bytearray
        out[f"{name}_files"] = len(names)
        out[f"_{name}_list"] = names
        out[f"{name}_bytes"] = len(buf)
        out[f"{name}_sha256"] = hashlib.sha256(bytes(buf)).hexdigest()
    return out


def corpus_meta(corpus: dict) -> dict:
    return {k: v for k, v in corpus.items() if not isinstance(v, torch.Tensor) and k[0] != "_"}


def windows(stream: torch.Tensor, starts: torch.Tensor, seq: int) -> torch.Tensor:
    """[n, seq + 1] token windows (int64) beginning at ``starts``."""
    idx = starts[:, None] + torch.arange(seq + 1, device=starts.device)
    return stream[idx].long()


def eval_windows(stream: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """A fixed set of ``n`` windows spread evenly over the eval slice."""
    last = stream.numel() - seq - 1
    starts = torch.linspace(0, last, n).long() if n > 1 else torch.zeros(1, dtype=torch.long)
    return windows(stream, starts, seq)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def build_model(cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], max_position_embeddings=cfg["seq"],
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        # SDPA's flash backward accumulates with atomics: bf16 reruns of one run differ (measured
        # on the H100); eager attention keeps every run bitwise repeatable
        attn_implementation=cfg["attn"],
    )
    return LlamaForCausalLM(config)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross entropy (nats/byte), computed in fp32 whatever the model dtype."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` then cosine decay to 10% of it (step counts from 0)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


def autocast_ctx(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch: int, device, amp: bool) -> float:
    was = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    chunks = data.split(batch)
    for chunk in chunks:
        with autocast_ctx(device, amp):
            total += lm_loss(model, chunk.to(device)).double() * chunk.shape[0]
    model.train(was)
    return float(total / data.shape[0])


def _bar(total, desc):
    if tqdm is None:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=2.0,
                disable=not sys.stderr.isatty() and os.environ.get("CONV_PROGRESS") != "1")


def pretrain(cfg: dict, corpus: dict, device, out_dir: str, ckpt_dir: str) -> dict:
    """Pre-train the base model once (or reuse a matching checkpoint in ``ckpt_dir``)."""
    from torch.utils.tensorboard import SummaryWriter

    keys = ("hidden", "inter", "layers", "heads", "kv_heads", "seq", "batch", "pretrain_steps",
            "pretrain_lr", "pretrain_seed")
    ident = {k: cfg[k] for k in keys} | {"corpus": corpus["pretrain_sha256"]}
    path = os.path.join(ckpt_dir, "base.pt")
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("ident") == json.dumps(ident, sort_keys=True):
            print(f"[pretrain] reusing {path}")
            return {"state": saved["state"], "reused": True, "final_loss": saved["final_loss"]}
    torch.manual_seed(cfg["pretrain_seed"])
    model = build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["pretrain_lr"], betas=(0.9, 0.95),
                            weight_decay=0.1)
    stream = corpus["pretrain"].to(device)
    gen = torch.Generator().manual_seed(cfg["pretrain_seed"])
    steps, warm = cfg["pretrain_steps"], max(1, cfg["pretrain_steps"] // 20)
    writer = SummaryWriter(os.path.join(out_dir, "pretrain"))
    bar, t0, loss_v = _bar(steps, "pretrain"), time.perf_counter(), float("nan")
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, cfg["pretrain_lr"], warm)
        starts = torch.randint(0, stream.numel() - cfg["seq"] - 1, (cfg["batch"],), generator=gen)
        with autocast_ctx(device, device.type == "cuda" or cfg["cpu_amp"]):
            loss = lm_loss(model, windows(stream, starts.to(device), cfg["seq"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            loss_v = loss.item()
            writer.add_scalar("pretrain/loss", loss_v, step + 1)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    writer.close()
    wall = time.perf_counter() - t0
    print(f"[pretrain] {steps} steps in {wall:.1f} s, final loss {loss_v:.4f} nats/byte")
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save({"ident": json.dumps(ident, sort_keys=True), "state": state, "final_loss": loss_v}, path)
    return {"state": state, "reused": False, "final_loss": loss_v, "wall_s": wall}


# ---------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def dora_impl(impl: str):
    """``PEFT_DORA_FUSED`` for the duration of one run (read by dorafactors on every forward)."""
    old = os.environ.get("PEFT_DORA_FUSED")
    os.environ["PEFT_DORA_FUSED"] = {"eager": "0", "fused": "1"}[impl]
    try:
        from dorafactors.dora_env import get_config

        assert get_config().fused is (impl == "fused"), get_config()
        yield
    finally:
        if old is None:
            os.environ.pop("PEFT_DORA_FUSED", None)
        else:
            os.environ["PEFT_DORA_FUSED"] = old


def dora_model(cfg: dict, base_state: dict, device, dtype, seed: int, perturb: float = 0.0):
    """The pretrained base with DoRA on every linear layer (call inside :func:`dora_impl`)."""
    import dorafactors
    from dorafactors.dora import DoraLinearLayer
    from peft import LoraConfig, get_peft_model

    dorafactors.enable()
    model = build_model(cfg)
    model.load_state_dict(base_state)
    model.to(device=device, dtype=dtype)
    exact = cfg["magnitude_init"] == "exact" and dtype != torch.float32
    if exact:
        # PEFT builds m while the adapters still have the base's bf16 dtype, so m starts as the
        # bf16-rounded norm and g = m/n is off 1 by up to ~2^-9 at step 0; eager (rounds (g-1)·base,
        # then the sum) and fused (rounds g·base once) then differ by an ulp from the first forward.
        # "exact": build the adapters on the bf16-valued weights held in fp32, then store the frozen
        # weights in bf16 again, so m is the fp32 norm of the very weights the forward uses (g = 1)
        model.float()
    torch.manual_seed(seed)  # the adapter init: same for eager and fused
    lcfg = LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=0.0, use_dora=True,
                      target_modules="all-linear", bias="none")
    model = get_peft_model(model, lcfg)
    if exact:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    if perturb:  # the butterfly control: A off by a rounding-sized amount, nothing else
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.mul_(1.0 + perturb)
    doras = [m for m in model.modules() if isinstance(m, DoraLinearLayer)]
    if not doras:
        raise RuntimeError("dorafactors.enable() did not take effect: no dorafactors DoRA layers")
    return model, len(doras)


def init_check(cfg: dict, base_state: dict, corpus: dict, device) -> dict:
    """Eager vs fused on the same weights before any update (B = 0, so DoRA is the identity):
    how far apart are the adapted layers' outputs, the logits and the loss of one batch?"""
    from peft.tuners.lora import Linear as LoraLinear

    amp = device.type == "cuda" or cfg["cpu_amp"]
    batch = eval_windows(corpus["eval"], cfg["batch"], cfg["seq"]).to(device)
    got = {}
    for impl in ("eager", "fused"):
        with dora_impl(impl):
            model, _ = dora_model(cfg, base_state, device, torch.bfloat16, cfg["seeds"][0])
            outs, ins = {}, {}

            def keep(name):
                def hook(mod, args, out):
                    outs[name], ins[name] = out.detach().float(), args[0].detach().float()
                return hook

            hooks = [m.register_forward_hook(keep(n)) for n, m in model.named_modules()
                     if isinstance(m, LoraLinear)]
            with autocast_ctx(device, amp):  # grad enabled: the training forward of step 1
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            for h in hooks:
                h.remove()
            got[impl] = (outs, ins, logits.detach(), float(loss))
            del model
    (eo, ei, el, eloss), (fo, fi, fl, floss) = got["eager"], got["fused"]
    differing = [n for n in eo if not torch.equal(eo[n], fo[n])]  # forward order
    first = differing[0] if differing else None
    return {
        "loss_abs": abs(floss - eloss),
        "logits_max_abs": float((fl - el).abs().max()),
        "modules": len(eo),
        "modules_output_differs": len(differing),
        "first_differing": first,
        "first_differing_input_identical": bool(torch.equal(ei[first], fi[first])) if first else None,
        "first_differing_output_max_abs": float((eo[first] - fo[first]).abs().max()) if first else 0.0,
    }


def finetune(cfg: dict, base_state: dict, corpus: dict, device, impl: str, seed: int,
             precision: str, logdir: str, steps: int, on_throughput=None, perturb: float = 0.0) -> dict:
    """One DoRA fine-tuning run; returns per-step train losses and the eval curve."""
    from torch.utils.tensorboard import SummaryWriter

    t_setup = time.perf_counter()
    amp = precision == "bf16" and (device.type == "cuda" or cfg["cpu_amp"])
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with dora_impl(impl):
        model, n_dora = dora_model(cfg, base_state, device, dtype, seed, perturb)
        params = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.999), weight_decay=0.0)
        ga, b, seq = cfg["grad_accum"], cfg["batch"], cfg["seq"]
        stream = corpus["finetune"].to(device)
        # the whole data order up front, from the seed alone
        gen = torch.Generator().manual_seed(10_000 + seed)
        starts = torch.randint(0, stream.numel() - seq - 1, (steps, ga, b), generator=gen).to(device)
        eval_data = eval_windows(corpus["eval"], cfg["eval_batches"] * b, seq)
        writer = SummaryWriter(logdir)
        warm = max(1, steps // 20)
        train, evals, grad_norms = [], {}, []

        eval_s = []

        def do_eval(step):
            t = time.perf_counter()
            # rounded to fp32 as TensorBoard stores it, so the summary and the event files agree
            evals[step] = float(torch.tensor(evaluate(model, eval_data, b, device, amp),
                                             dtype=torch.float32))
            writer.add_scalar(EVAL_TAG, evals[step], step)
            eval_s.append(time.perf_counter() - t)

        do_eval(0)
        model.train()
        bar = _bar(steps, f"{precision} {impl} seed {seed}")
        t0 = time.perf_counter()
        setup_s = t0 - t_setup
        t_mark, eval_mark = None, 0
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, cfg["lr"], warm)
            acc = torch.zeros((), dtype=torch.float32, device=device)
            for micro in range(ga):
                with autocast_ctx(device, amp):
                    loss = lm_loss(model, windows(stream, starts[step, micro], seq))
                (loss / ga).backward()
                acc += loss.detach() / ga
            gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_v, gn_v = torch.stack([acc, gn.float()]).tolist()  # one sync per step
            train.append(loss_v)
            grad_norms.append(gn_v)
            writer.add_scalar(TRAIN_TAG, loss_v, step + 1)
            writer.add_scalar("train/grad_norm", gn_v, step + 1)
            writer.add_scalar("train/lr", opt.param_groups[0]["lr"], step + 1)
            if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
                do_eval(step + 1)
            if step == 4:  # time steps past compilation and autotuning, evals excluded
                t_mark, eval_mark = time.perf_counter(), len(eval_s)
            elif step == 24 and on_throughput is not None:
                on_throughput((time.perf_counter() - t_mark - sum(eval_s[eval_mark:])) / 20,
                              ga * b * seq)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_v:.4f}", refresh=False)
        wall = time.perf_counter() - t0
        step_s = ((time.perf_counter() - t_mark - sum(eval_s[eval_mark:])) / (steps - 5)
                  if t_mark is not None and steps > 5 else wall / steps)
        if bar is not None:
            bar.close()
        writer.close()
        del model, opt
    print(f"[{precision} {impl} seed {seed}] {steps} steps in {wall:.1f} s; train loss "
          f"{train[0]:.4f} -> {train[-1]:.4f}, eval {evals[0]:.4f} -> {evals[steps]:.4f}")
    return {"train": train, "eval": evals, "grad_norm": grad_norms, "wall_s": wall,
            "setup_s": setup_s, "step_s": step_s, "eval_s": max(eval_s),
            "dora_modules": n_dora, "trainable_params": n_trainable}


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def pair_stats(a: dict, b: dict) -> dict:
    """|b - a| statistics of two runs of the same seed (per-step train loss, final eval loss)."""
    d = [abs(y - x) for x, y in zip(a["train"], b["train"])]
    common = sorted(set(a["eval"]) & set(b["eval"]))
    last = common[-1]
    return {
        "steps": len(d),
        "mean_abs": _mean(d),
        "max_abs": max(d),
        "argmax_step": d.index(max(d)) + 1,
        "step1_abs": d[0],
        f"first{EARLY_STEPS}_mean_abs": _mean(d[:EARLY_STEPS]),
        f"after{EARLY_STEPS}_mean_abs": _mean(d[EARLY_STEPS:]),
        "last10pct_mean_abs": _mean(d[-max(1, len(d) // 10):]),
        "eval0_abs": abs(b["eval"][0] - a["eval"][0]),
        "final_eval_step": last,
        "final_eval_abs": abs(b["eval"][last] - a["eval"][last]),
        "final_eval": [a["eval"][last], b["eval"][last]],
        "final_train": [a["train"][-1], b["train"][-1]],
        "eval_abs": {str(s): abs(b["eval"][s] - a["eval"][s]) for s in common},
    }


def group_stats(per_seed: dict, d_all: dict, targets: dict) -> dict:
    """Across seeds: per-step |Δ| over every (seed, step) pair, final eval |Δ| per seed."""
    diffs = [v for s in sorted(d_all) for v in d_all[s]]
    early = [v for s in sorted(d_all) for v in d_all[s][:EARLY_STEPS]]
    late = [v for s in sorted(d_all) for v in d_all[s][EARLY_STEPS:]]
    ev = [per_seed[s]["final_eval_abs"] for s in sorted(per_seed)]
    out = {
        "seeds": sorted(per_seed),
        "n_pairs": len(diffs),
        "mean_abs_dloss": _mean(diffs),
        "max_abs_dloss": max(diffs),
        f"first{EARLY_STEPS}_mean_abs_dloss": _mean(early),
        f"after{EARLY_STEPS}_mean_abs_dloss": _mean(late),
        "final_eval_abs_dloss_mean": _mean(ev),
        "final_eval_abs_dloss_max": max(ev),
        "per_seed": {str(s): per_seed[s] for s in sorted(per_seed)},
    }
    out["target_met"] = {
        "mean_abs_dloss": out["mean_abs_dloss"] < targets["mean"],
        "final_eval_abs_dloss": out["final_eval_abs_dloss_max"] < targets["eval"],
    }
    return out


def print_table(name: str, g: dict) -> None:
    print(f"\n== {name}: eager vs fused, |Δloss| (nats/byte) ==")
    hdr = (f"{'seed':>4} {'final train e/f':>19} {'final eval e/f':>19} {'mean|Δ|':>10} "
           f"{'max|Δ|':>10} {'≤100 mean':>10} {'>100 mean':>10} {'eval |Δ|':>10}")
    print(hdr)
    fmt = lambda x: f"{x:10.2e}" if x is not None else f"{'-':>10}"  # noqa: E731
    for s, p in g["per_seed"].items():
        print(f"{s:>4} {p['final_train'][0]:9.5f}/{p['final_train'][1]:9.5f} "
              f"{p['final_eval'][0]:9.5f}/{p['final_eval'][1]:9.5f} {fmt(p['mean_abs'])} "
              f"{fmt(p['max_abs'])} {fmt(p[f'first{EARLY_STEPS}_mean_abs'])} "
              f"{fmt(p[f'after{EARLY_STEPS}_mean_abs'])} {fmt(p['final_eval_abs'])}")
    print(f" all {'':>19} {'':>19} {fmt(g['mean_abs_dloss'])} {fmt(g['max_abs_dloss'])} "
          f"{fmt(g[f'first{EARLY_STEPS}_mean_abs_dloss'])} "
          f"{fmt(g[f'after{EARLY_STEPS}_mean_abs_dloss'])} {fmt(g['final_eval_abs_dloss_max'])}"
          f"  (eval: max over seeds)")
    print(f"target met: {g['target_met']}")


def environment(device) -> dict:
    import peft
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "peft": peft.__version__, "transformers": transformers.__version__,
           "device": str(device), "gpu": None, "cuda": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "code", "convergence_runs"),
                    help="TensorBoard runs root (default: code/convergence_runs/)")
    ap.add_argument("--summary", default=None,
                    help="summary JSON path (default: <out-dir>/summary.json)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model and few steps (CPU, < 60 s); the 'smoke' preset")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per fine-tuning run")
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--pretrain-seed", type=int, default=1234)
    ap.add_argument("--pretrained-dir", default=None,
                    help="where the pretrained base is saved / reused (default: a temp dir)")
    for name in ("grad_accum", "batch", "seq", "rank", "alpha", "eval_every", "eval_batches",
                 "hidden", "inter", "layers", "heads", "kv_heads"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--magnitude-init", choices=("peft", "exact"), default="peft",
                    help="peft: as PEFT does on a bf16 model (m = bf16-rounded norm, g != 1 at step "
                         "0); exact: m = fp32 norm of the bf16 weights (g = 1 at step 0)")
    ap.add_argument("--attn", choices=("eager", "sdpa"), default=None,
                    help="attention implementation (default eager: bitwise repeatable backward)")
    ap.add_argument("--pretrain-lr", type=float, default=None)
    ap.add_argument("--fp32-control-seeds", type=int, default=0,
                    help="also run eager vs fused in fp32 (no autocast, no TF32) for this many seeds")
    ap.add_argument("--fp32-control-steps", type=int, default=None,
                    help="steps of the fp32 control runs (default: --steps)")
    ap.add_argument("--rerun-control", action="store_true",
                    help="run eager seed <first> twice: the run-to-run floor of eager itself")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds of wall time for the whole script: after pretraining, short "
                         "timing runs scale --steps (and the fp32 control) down to fit")
    ap.add_argument("--calib-steps", type=int, default=25,
                    help="steps of each throw-away timing run of --time-budget")
    ap.add_argument("--ulp-control", action="store_true",
                    help="run eager seed <first> again with lora_A scaled by 1 + 2^-16: how far "
                         "a rounding-sized difference alone carries a bf16 run")
    ap.add_argument("--max-corpus-bytes", type=int, default=None,
                    help="cap each slice (the smoke preset caps at 256 KiB)")
    ap.add_argument("--target-mean", type=float, default=1e-3)
    ap.add_argument("--target-eval", type=float, default=1e-4)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--no-deterministic", action="store_true",
                    help="leave torch.use_deterministic_algorithms off (to measure what it costs)")
    ap.add_argument("--cpu-amp", action="store_true",
                    help="use bf16 autocast on the CPU as well (default there: off unless --smoke)")
    args = ap.parse_args(argv)
    preset = args.preset or ("smoke" if args.smoke else "small")
    cfg = dict(PRESETS[preset], preset=preset)
    for k in list(cfg):
        v = getattr(args, k, None)
        if v is not None and k != "preset":
            cfg[k] = v
    cfg["pretrain_seed"] = args.pretrain_seed
    cfg["magnitude_init"] = args.magnitude_init
    cfg["cpu_amp"] = args.cpu_amp or args.smoke
    if args.max_corpus_bytes is None and preset == "smoke":
        args.max_corpus_bytes = 256 * 1024
    args.summary = args.summary or os.path.join(args.out_dir, "summary.json")
    return args, cfg


def write_summary(path: str, summary: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=1, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)


def plan_steps(args, cfg: dict, base_state: dict, corpus: dict, device, t_start: float) -> dict:
    """Fit the fine-tuning runs into ``--time-budget`` seconds of wall time (whole script).

    Short throw-away runs time one step, one eval and the setup of every (precision, impl)
    needed; then the requested step counts are scaled down (never up) so that all runs fit,
    keeping the fp32-control/main ratio and whole eval intervals. Deciding before any logged
    run starts keeps eager and fused of a seed on the same schedule.
    """
    want_main = cfg["steps"]
    want_fp32 = args.fp32_control_steps or want_main
    kinds = [("bf16", "eager"), ("bf16", "fused")]
    if args.fp32_control_seeds:
        kinds += [("fp32", "eager"), ("fp32", "fused")]
    scratch = tempfile.mkdtemp(prefix="conv_calib_")
    timing = {}
    calib_cfg = dict(cfg, eval_every=10 ** 9)  # evals only at step 0 and the end
    for precision, impl in kinds:
        r = finetune(calib_cfg, base_state, corpus, device, impl, 0, precision,
                     os.path.join(scratch, f"{precision}_{impl}"), args.calib_steps)
        timing[f"{precision}_{impl}"] = {k: r[k] for k in ("setup_s", "step_s", "eval_s")}
    n_main = 2 * len(cfg["seeds"])
    n_fp32 = 2 * min(args.fp32_control_seeds, len(cfg["seeds"]))
    ev = cfg["eval_every"]

    def runs():  # (timing, steps share of the main count, how many such runs)
        extra = int(args.rerun_control) + int(args.ulp_control)
        out = [(timing["bf16_eager"], 1.0, n_main // 2 + extra),
               (timing["bf16_fused"], 1.0, n_main // 2)]
        if n_fp32:
            out += [(timing["fp32_eager"], want_fp32 / want_main, n_fp32 // 2),
                    (timing["fp32_fused"], want_fp32 / want_main, n_fp32 // 2)]
        return out

    fixed = sum(n * (t["setup_s"] + 2 * t["eval_s"]) for t, _, n in runs())
    per_step = sum(n * share * (t["step_s"] + t["eval_s"] / ev) for t, share, n in runs())
    left = args.time_budget - (time.perf_counter() - t_start)
    usable = 0.92 * left - fixed  # margin for summaries, writers and timing noise
    fit = int(usable / per_step) if usable > 0 else 0
    steps = max(ev, min(want_main, fit // ev * ev))
    fp32 = max(ev, min(want_fp32, int(steps * want_fp32 / want_main) // ev * ev))
    plan = {"time_budget_s": args.time_budget, "left_after_calibration_s": left,
            "requested_steps": want_main, "requested_fp32_control_steps": want_fp32,
            "steps": steps, "fp32_control_steps": fp32, "timing": timing,
            "predicted_s": fixed + per_step * steps}
    print(f"[plan] {left:.0f} s left; per step " + ", ".join(
        f"{k} {v['step_s'] * 1e3:.1f} ms" for k, v in timing.items())
        + f"; {steps} steps per run (requested {want_main}), fp32 control {fp32}; "
          f"predicted {plan['predicted_s']:.0f} s", flush=True)
    return plan


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # same kernels, same order, run to run: what is left between eager and fused is the kernels
    torch.use_deterministic_algorithms(not args.no_deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = False
    t_start = time.perf_counter()
    corpus = load_corpus(args.max_corpus_bytes)
    meta = corpus_meta(corpus)
    print(f"[corpus] stdlib {meta['root']} (Python {meta['python']}), split by {meta['split']}: "
          + ", ".join(f"{n} {meta[n + '_files']} files / {meta[n + '_bytes'] / 1e6:.2f} MB"
                      for n in ("pretrain", "finetune", "eval")))
    env = environment(device)
    print(f"[env] {env}")
    print(f"[config] {cfg}")
    ckpt_dir = args.pretrained_dir or tempfile.mkdtemp(prefix="conv_base_")
    base = pretrain(cfg, corpus, device, args.out_dir, ckpt_dir)

    init = init_check(cfg, base["state"], corpus, device)
    print(f"[init check] eager vs fused, same weights, B = 0: loss |Δ| {init['loss_abs']:.2e}, "
          f"logits max |Δ| {init['logits_max_abs']:.2e}, {init['modules_output_differs']}/"
          f"{init['modules']} adapted layers differ (first: {init['first_differing']}, its input "
          f"identical: {init['first_differing_input_identical']})", flush=True)
    fp32_steps = args.fp32_control_steps or cfg["steps"]
    plan = None
    if args.time_budget:
        plan = plan_steps(args, cfg, base["state"], corpus, device, t_start)
        cfg["steps"], fp32_steps = plan["steps"], plan["fp32_control_steps"]
    groups = [("bf16", "bf16", cfg["seeds"], cfg["steps"])]
    if args.fp32_control_seeds:
        groups.append(("fp32_control", "fp32", cfg["seeds"][:args.fp32_control_seeds], fp32_steps))
    n_extra = int(args.rerun_control) + int(args.ulp_control)
    n_runs = sum(2 * len(s) for _, _, s, _ in groups) + n_extra
    summary = {
        "what": "DoRA fine-tuning, dorafactors eager (PEFT_DORA_FUSED=0) vs fused (=1); "
                "|Δ| = |fused - eager| of per-step train loss and of eval loss, nats/byte",
        "config": cfg, "environment": env, "corpus": meta,
        "pretrain": {"steps": cfg["pretrain_steps"], "final_loss": base["final_loss"],
                     "reused": base["reused"], "wall_s": base.get("wall_s")},
        "plan": plan, "init_check": init, "deterministic": not args.no_deterministic,
        "targets": {"mean_abs_dloss": args.target_mean, "final_eval_abs_dloss": args.target_eval},
        "groups": {}, "controls": {}, "complete": False,
    }
    targets = {"mean": args.target_mean, "eval": args.target_eval}
    announced = []

    def on_throughput(s_per_step, tokens):
        if announced:
            return
        announced.append(1)
        total = sum(2 * len(s) * st for _, _, s, st in groups) + n_extra * cfg["steps"]
        print(f"[throughput] {s_per_step * 1e3:.1f} ms/step, {tokens / s_per_step:,.0f} tokens/s; "
              f"~{total * s_per_step / 60:.1f} min for all {n_runs} runs ({total} steps) at this rate",
              flush=True)

    results = {}
    for name, precision, seeds, steps in groups:
        if precision == "fp32" and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        per_seed, d_all = {}, {}
        for seed in seeds:
            runs = {}
            for impl in ("eager", "fused"):
                runs[impl] = finetune(cfg, base["state"], corpus, device, impl, seed, precision,
                                      os.path.join(args.out_dir, name, f"{impl}_seed{seed}"), steps,
                                      on_throughput)
                results[(name, impl, seed)] = runs[impl]
            per_seed[seed] = pair_stats(runs["eager"], runs["fused"])
            d_all[seed] = [abs(f - e) for e, f in zip(runs["eager"]["train"], runs["fused"]["train"])]
            g = group_stats(per_seed, d_all, targets)
            g.update(precision=precision, steps=steps,
                     dora_modules=runs["eager"]["dora_modules"],
                     trainable_params=runs["eager"]["trainable_params"],
                     wall_s={impl: {str(s): results[(name, impl, s)]["wall_s"] for s in per_seed}
                             for impl in ("eager", "fused")})
            summary["groups"][name] = g
            write_summary(args.summary, summary)

    controls = []
    if args.rerun_control:
        controls.append(("eager_rerun", 0.0))
    if args.ulp_control:
        controls.append(("eager_ulp", ULP_PERTURB))
    for name, perturb in controls:
        seed = cfg["seeds"][0]
        again = finetune(cfg, base["state"], corpus, device, "eager", seed, "bf16",
                         os.path.join(args.out_dir, "controls", f"{name}_seed{seed}"),
                         cfg["steps"], perturb=perturb)
        st = pair_stats(results[("bf16", "eager", seed)], again)
        st.pop("eval_abs")
        summary["controls"][name] = dict(st, seed=seed, perturb_lora_A=perturb,
                                         bitwise_identical=st["max_abs"] == 0.0
                                         and st["final_eval_abs"] == 0.0)
        write_summary(args.summary, summary)

    summary["complete"] = True
    summary["wall_s"] = time.perf_counter() - t_start
    write_summary(args.summary, summary)
    for name in summary["groups"]:
        print_table(name, summary["groups"][name])
    for name, c in summary["controls"].items():
        print(f"\n{name} vs eager (bf16, seed {c['seed']}): mean |Δ| {c['mean_abs']:.2e}, max |Δ| "
              f"{c['max_abs']:.2e}, first {EARLY_STEPS} steps {c[f'first{EARLY_STEPS}_mean_abs']:.2e}, "
              f"final eval |Δ| {c['final_eval_abs']:.2e}")
    print(f"\n[done] {summary['wall_s']:.0f} s; summary: {args.summary}; runs: {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
