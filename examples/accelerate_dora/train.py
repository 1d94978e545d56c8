#!/usr/bin/env python
"""Fine-tune a causal LM with dorafactors' DoRA under ``accelerate launch`` (FSDP2 or DeepSpeed ZeRO-3).

    accelerate launch --config_file examples/accelerate_dora/fsdp2.yaml examples/accelerate_dora/train.py
    accelerate launch --config_file examples/accelerate_dora/zero3.yaml examples/accelerate_dora/train.py

Without ``--model`` the model is a Llama built from its config with random weights (``--size``),
so nothing is downloaded; the data is synthetic (each token is the previous one plus one, modulo
the vocabulary), which a LoRA/DoRA adapter learns in a few dozen steps, so the printed loss shows
training works. ``--model ID_OR_PATH`` fine-tunes a pretrained model instead (the FSDP2 config
wraps ``LlamaDecoderLayer``: change ``fsdp_transformer_layer_cls_to_wrap`` for other families).
``--impl upstream`` runs PEFT's own DoRA for comparison.
"""

from __future__ import annotations

import argparse
import time

import torch

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pretrained model id or path (default: random weights, --size)")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--impl", choices=("ours", "upstream"), default="ours")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (lora_alpha = 2r)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="sequences per process and micro-batch")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--save", default=None, help="save the adapter to this folder at the end")
    return p.parse_args(argv)


def build_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=args.seq, **SIZES[args.size]))


def dataset(args, vocab: int, world: int):
    """Sequences of 'next token = previous + 1 (mod vocab)' from random starts, enough for every rank."""
    gen = torch.Generator().manual_seed(1000)
    start = torch.randint(0, vocab, (args.steps * args.batch * world, 1), generator=gen)
    return torch.utils.data.TensorDataset((start + torch.arange(args.seq)) % vocab)


def main(argv=None) -> None:
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    import dorafactors

    args = parse_args(argv)
    accelerator = Accelerator()
    model = build_model(args)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", use_dora=True)
    with dorafactors.enabled(args.impl == "ours"):  # DoRA layers are created here
        model = get_peft_model(model, config)
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    vocab = model.config.vocab_size  # before prepare: the wrapped model may not expose .config
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    # a DataLoader (DeepSpeed takes its micro-batch size from it); prepare() splits it over the ranks
    loader = torch.utils.data.DataLoader(dataset(args, vocab, accelerator.num_processes), batch_size=args.batch)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    t0 = time.perf_counter()
    for step, (ids,) in enumerate(loader, start=1):
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            mean = accelerator.reduce(loss.detach(), reduction="mean").item()
            accelerator.print(f"step {step:4d}  loss {mean:.4f}  ({time.perf_counter() - t0:.1f} s)")
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"rank {accelerator.process_index}: peak allocated {peak:.2f} GiB", flush=True)
    if args.save:
        state = accelerator.get_state_dict(model)  # gathers the sharded parameters
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(args.save, state_dict=state)
            accelerator.print(f"adapter saved to {args.save}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
