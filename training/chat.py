"""Chat with a trained actor: multi-turn, on any device.

    python training/chat.py --path output/rlhf/actor [--device auto] [--max_new_tokens 128]

Type a message and press enter; `clear` starts a new conversation, `quit` (or end of input) leaves.
"""

from __future__ import annotations

import argparse
import sys

import torch

import accel
from dschat_hal.data.tokens import Encoder
from dschat_hal.errors import UserError, cli_entry
from dschat_hal.models import check_model_source, load_tokenizer
from dschat_hal.models.lm import load_pretrained


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="a directory written by save_pretrained (e.g. output/rlhf/actor)")
    p.add_argument("--device", default="auto", choices=accel.DEVICE_CHOICES)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def context_limit(model) -> int | None:
    """The model's position limit (None for models without one, e.g. ALiBi)."""
    config = getattr(model, "config", None)
    return next(
        (getattr(config, k) for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None)), None
    )


def fit_to_context(inputs: dict, limit: int | None, max_new_tokens: int) -> dict:
    """Keep the newest tokens of the conversation so that it and the answer fit the model; say so."""
    if limit is None or inputs["input_ids"].size(1) + max_new_tokens <= limit:
        return inputs
    keep = limit - max_new_tokens
    print(
        f"note: the conversation ({inputs['input_ids'].size(1)} tokens) plus --max_new_tokens {max_new_tokens} "
        f"exceeds the model's {limit} positions; keeping its last {keep} tokens",
        file=sys.stderr,
        flush=True,
    )
    return {k: v[:, -keep:] for k, v in inputs.items()}


def answer(model, tokenizer, backend, conversation: str, max_new_tokens: int, greedy: bool) -> str:
    ids = torch.tensor(Encoder(tokenizer).prompts([conversation]), dtype=torch.long)
    encoded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs = backend.to_device(fit_to_context(encoded, context_limit(model), max_new_tokens))
    with torch.no_grad(), backend.generation_context(model) as generator:
        out = generator.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            top_p=0.9,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    text = tokenizer.decode(out[0, inputs["input_ids"].size(1) :], skip_special_tokens=True)
    return text.split("Human:")[0].strip()


@cli_entry
def main(argv: list[str]) -> int:
    from transformers import AutoModelForCausalLM

    args = parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1 (got {args.max_new_tokens})")
    check_model_source(args.path)
    backend = accel.get(args.device)
    tokenizer = load_tokenizer(args.path)
    model = backend.to_device(load_pretrained(AutoModelForCausalLM, args.path)).eval()
    limit = context_limit(model)
    if limit is not None and args.max_new_tokens >= limit:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for input in {limit} positions")
    interactive = sys.stdin.isatty()
    conversation = ""
    while True:
        if interactive:
            print("Human: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "quit":
            return 0
        if line.strip() == "clear":
            conversation = ""
            continue
        conversation += f" Human: {line.strip()} Assistant:"
        reply = answer(model, tokenizer, backend, conversation, args.max_new_tokens, args.greedy)
        conversation += f" {reply}"
        print(f"Assistant: {reply}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
