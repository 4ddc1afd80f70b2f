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
from dschat_hal.errors import cli_entry
from dschat_hal.models import check_model_source, load_tokenizer


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="a directory written by save_pretrained (e.g. output/rlhf/actor)")
    p.add_argument("--device", default="auto", choices=accel.DEVICE_CHOICES)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def answer(model, tokenizer, backend, conversation: str, max_new_tokens: int, greedy: bool) -> str:
    ids = torch.tensor(Encoder(tokenizer).prompts([conversation]), dtype=torch.long)
    inputs = backend.to_device({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
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
    backend = accel.get(args.device)
    check_model_source(args.path)
    tokenizer = load_tokenizer(args.path)
    model = backend.to_device(AutoModelForCausalLM.from_pretrained(args.path)).eval()
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
