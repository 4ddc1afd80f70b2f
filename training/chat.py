"""Chat with a trained actor: multi-turn, on any device.

    python training/chat.py --path output/rlhf/actor [--device auto] [--max_new_tokens 128]

Type a message and press enter; `clear` starts a new conversation, `quit` (or end of input, or a
closed stdin) leaves with exit code 0; empty lines are skipped. Output piped into a reader that exits
(`| head -1`) ends chat quietly with exit code 141, as a tool killed by SIGPIPE. Pass
`--prompt_format chat_template` for an actor trained with it.
"""
# ruff: noqa: E402  (`--help` is answered before the heavy imports)

from __future__ import annotations

import accel  # isort: skip  (first: it sets the OpenMP wait policy, which torch reads once when it loads)

import argparse
import sys

from dschat_hal.args import ATTN_HELP, ATTN_IMPLEMENTATIONS, PROMPT_FORMATS, answer_help


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="a directory written by save_pretrained (e.g. output/rlhf/actor)")
    p.add_argument("--device", default="auto", choices=accel.DEVICE_CHOICES)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling (top-p 0.9)")
    p.add_argument(
        "--prompt_format",
        choices=PROMPT_FORMATS,
        default="plain",
        help="plain: 'Human: ... Assistant:' text; chat_template: the tokenizer's chat template (as in training)",
    )
    p.add_argument("--attn_implementation", default=None, choices=ATTN_IMPLEMENTATIONS, help=ATTN_HELP)
    p.add_argument("--debug", action="store_true")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The chat flags."""
    return _parser().parse_args(argv)


if __name__ == "__main__":
    answer_help(_parser)  # before the imports below load torch and transformers (seconds)

import torch

from dschat_hal.data.chat_format import ChatTemplate
from dschat_hal.data.tokens import Encoder
from dschat_hal.errors import UserError, cli_entry
from dschat_hal.models import check_model_source, is_reward_checkpoint, load_tokenizer
from dschat_hal.models.end_tokens import answer_end_ids
from dschat_hal.models.lm import load_pretrained


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


class Conversation:
    """The turns so far, as the actor was trained to read them: `Human: … Assistant: …` text, or
    messages rendered with the tokenizer's chat template."""

    def __init__(self, tokenizer, prompt_format: str = "plain") -> None:
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer) if prompt_format == "chat_template" else None
        self.turns: list[tuple[str, str]] = []

    def clear(self) -> None:
        self.turns = []

    def prompt(self, message: str) -> str:
        """The conversation text that asks for the assistant's answer to `message`."""
        if self.template is not None:
            messages = [
                m
                for user, reply in self.turns
                for m in ({"role": "user", "content": user}, {"role": "assistant", "content": reply})
            ]
            return self.template.messages_prompt([*messages, {"role": "user", "content": message}])
        return " ".join([*(f"Human: {u} Assistant: {r}" for u, r in self.turns), f"Human: {message} Assistant:"])

    def prompt_ids(self, message: str) -> list[int]:
        if self.template is not None:
            return self.tokenizer(self.prompt(message), add_special_tokens=False)["input_ids"]
        return Encoder(self.tokenizer).prompts([self.prompt(message)])[0]

    def add(self, message: str, reply: str) -> None:
        self.turns.append((message, reply))


def answer(model, tokenizer, backend, conversation: str | list[int], max_new_tokens: int, greedy: bool) -> str:
    """The model's reply to `conversation` (plain text, or token ids already encoded), up to the
    first id that ends an answer (`end_tokens.answer_end_ids`)."""
    ids = conversation if isinstance(conversation, list) else Encoder(tokenizer).prompts([conversation])[0]
    ids = torch.tensor([ids], dtype=torch.long)
    encoded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs = backend.to_device(fit_to_context(encoded, context_limit(model), max_new_tokens))
    sampling = {} if greedy else {"top_p": 0.9}
    ends = answer_end_ids(tokenizer)
    with torch.no_grad(), backend.generation_context(model) as generator:
        try:
            out = generator.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=not greedy,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=ends[0] if len(ends) == 1 else ends,
                **sampling,
            )
        except RuntimeError as err:
            if "probability tensor" not in str(err):
                raise
            raise UserError(non_finite_message(getattr(model, "name_or_path", "the model"))) from None
    text = tokenizer.decode(out[0, inputs["input_ids"].size(1) :], skip_special_tokens=True)
    return text.split("Human:")[0].strip()


def non_finite_message(path: str) -> str:
    return (
        f"the model at {path} gives non-finite (NaN/inf) scores: its weights are damaged or training diverged; "
        "chat with another checkpoint (e.g. an earlier one, or one trained with a lower learning rate)"
    )


@torch.no_grad()
def check_finite(model, tokenizer, backend, path: str) -> None:
    """One forward on a short input: a model whose logits are NaN/inf is refused in one line."""
    ids = torch.tensor([Encoder(tokenizer).prompts(["Human: hi Assistant:"])[0]], dtype=torch.long)
    logits = model(**backend.to_device({"input_ids": ids, "attention_mask": torch.ones_like(ids)})).logits
    if not bool(torch.isfinite(logits.float()).all()):
        raise UserError(non_finite_message(path))


def read_line(stream) -> tuple[str | None, bool]:
    """(the next input line, whether it had bytes that are not UTF-8); None at end of input (or when
    `stream` is None: stdin was closed). Bytes that do not decode become U+FFFD."""
    if stream is None:  # stdin closed (`<&-`): Python has no sys.stdin; as end of input
        return None, False
    raw = getattr(stream, "buffer", None)
    line = stream.readline() if raw is None else raw.readline()
    if isinstance(line, str):
        return (line or None), False
    if not line:
        return None, False
    try:
        return line.decode("utf-8"), False
    except UnicodeDecodeError:
        return line.decode("utf-8", errors="replace"), True


@cli_entry
def main(argv: list[str]) -> int:
    from transformers import AutoModelForCausalLM

    args = parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1 (got {args.max_new_tokens})")
    check_model_source(args.path)
    if is_reward_checkpoint(args.path):
        raise UserError(
            f"--path {args.path} is a step-2 reward model (it scores answers, it does not write them); "
            "chat with an actor: step 1's or step 3's output (e.g. output/rlhf/actor)"
        )
    backend = accel.get(args.device)
    tokenizer = load_tokenizer(args.path)
    conversation = Conversation(tokenizer, args.prompt_format)
    ends = answer_end_ids(tokenizer)
    print(
        "answers end at " + ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in ends),
        file=sys.stderr,
        flush=True,
    )
    model = backend.to_device(
        load_pretrained(AutoModelForCausalLM, args.path, attn_implementation=args.attn_implementation)
    ).eval()
    limit = context_limit(model)
    if limit is not None and args.max_new_tokens >= limit:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for input in {limit} positions")
    check_finite(model, tokenizer, backend, args.path)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    while True:
        if interactive:
            print("Human: ", end="", flush=True)
        line, replaced = read_line(sys.stdin)
        if line is None or line.strip() == "quit":
            return 0
        if replaced:
            print("note: the input was not valid UTF-8; undecodable bytes became '\ufffd'", file=sys.stderr)
        message = line.strip()
        if not message:
            continue
        if message == "clear":
            conversation.clear()
            continue
        ids = conversation.prompt_ids(message)
        reply = answer(model, tokenizer, backend, ids, args.max_new_tokens, args.greedy)
        conversation.add(message, reply)
        print(f"Assistant: {reply}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
