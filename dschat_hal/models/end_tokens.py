"""Which token ids end an answer: the tokenizer, the model's config and its generation config, reconciled.

Real checkpoints disagree with themselves: a converted tokenizer may name its BOS as EOS (SmolLM2's
GGUF: bos = eos = `<|im_start|>`, no pad) while `config.json` says eos = `<|im_end|>`; instruct
models end their turns in a token their generation config lists beside EOS (Llama 3's
`<|eot_id|>`, Qwen's `<|im_end|>`). At load (`reconcile`) the tokenizer's EOS is what training
sequences end with (the model config's when the tokenizer's is missing or is its BOS), pad falls
back to that EOS, and every id that ends an answer is collected: that EOS, the generation config's
and the config's `eos_token_id` (an int or a list), and the chat template's end of turn. The list
is kept on the tokenizer (`answer_end_ids`) and written into the saved model's config and
generation config (`apply_to_model`), so a reload agrees with itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_ATTR = "answer_end_ids"
_SENTINEL = "Zq9xAnswerMarker"


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def _read_json(name_or_path: str, filename: str) -> dict:
    """`filename` of a local model directory or a hub model in the local cache ({} when absent)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        file = path / filename
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name_or_path, filename)
            if not isinstance(found, str):
                from dschat_hal.models.basics import hub_reachable

                if hub_reachable():
                    from transformers.utils import cached_file

                    found = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)
        except Exception:  # an invalid repo id or an unreachable file: nothing to read
            return {}
        file = Path(found) if isinstance(found, str) else None
    if file is None or not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a broken config.json is reported by the model loader
    return data if isinstance(data, dict) else {}


def model_eos_ids(name_or_path: str | None) -> tuple[list[int], list[int]]:
    """(config.json's eos ids, generation_config.json's eos ids) of a saved model; empty when unknown."""
    if not name_or_path:
        return [], []
    config = _read_json(name_or_path, "config.json")
    generation = _read_json(name_or_path, "generation_config.json")
    return _as_ids(config.get("eos_token_id")), _as_ids(generation.get("eos_token_id"))


def special_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return ids | {i for i, token in decoder.items() if getattr(token, "special", False)}


def template_end_of_turn(tokenizer: Any) -> int | None:
    """The special token the chat template puts right after an assistant message (None without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that cannot render this conversation names no end here
        return None
    if _SENTINEL not in text:
        return None
    tail = tokenizer(text.split(_SENTINEL, 1)[1], add_special_tokens=False)["input_ids"]
    specials = special_ids(tokenizer)
    for token in tail:
        if token in specials:
            return token
        if tokenizer.decode([token]).strip():
            return None
    return None


def _name(tokenizer: Any, token_id: int) -> str:
    return f"{tokenizer.convert_ids_to_tokens(token_id)!r} ({token_id})"


def reconcile(tokenizer: Any, name_or_path: str | None) -> str:
    """Set the tokenizer's EOS, pad and `answer_end_ids` consistently with the model at
    `name_or_path`; returns the one line saying which ids end an answer and why."""
    config_ids, generation_ids = model_eos_ids(name_or_path)
    vocab = len(tokenizer)
    config_ids = [i for i in config_ids if 0 <= i < vocab]
    generation_ids = [i for i in generation_ids if 0 <= i < vocab]
    model_ids = generation_ids + [i for i in config_ids if i not in generation_ids]
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    why_eos = "the tokenizer's eos"
    if eos is None and model_ids:
        eos = model_ids[0]
        why_eos = "the model config's eos (the tokenizer names none)"
    elif eos is not None and eos == bos and model_ids and eos not in model_ids:
        log.warning(
            "warning: the tokenizer's eos %s is also its bos, and the model's config names %s as eos: "
            "using %s to end sequences (the tokenizer is re-saved that way)",
            _name(tokenizer, eos),
            _name(tokenizer, model_ids[0]),
            _name(tokenizer, model_ids[0]),
        )
        eos = model_ids[0]
        why_eos = "the model config's eos (the tokenizer's was its bos)"
    if eos is not None and eos != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if tokenizer.eos_token_id is None:
        return ""  # load_tokenizer reports a tokenizer with no end token at all
    ends: dict[int, str] = {tokenizer.eos_token_id: why_eos}
    for token in generation_ids:
        ends.setdefault(token, "generation_config.json")
    for token in config_ids:
        ends.setdefault(token, "config.json")
    turn_end = template_end_of_turn(tokenizer)
    if turn_end is not None and (turn_end != bos or turn_end == tokenizer.eos_token_id):
        ends.setdefault(turn_end, "the chat template's end of turn")
    setattr(tokenizer, _ATTR, list(ends))
    return "answers end at " + ", ".join(f"{_name(tokenizer, t)}: {why}" for t, why in ends.items())


def answer_end_ids(tokenizer: Any) -> list[int]:
    """The ids that end a generated answer (the tokenizer's EOS when `reconcile` never ran)."""
    ids = getattr(tokenizer, _ATTR, None)
    if ids:
        return list(ids)
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def apply_to_model(model: Any, tokenizer: Any) -> None:
    """Write the tokenizer's pad/EOS and the answer end ids into the model's config and generation
    config, so that `save_pretrained` writes a model whose files agree with its tokenizer."""
    ends = answer_end_ids(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.end_token_id = tokenizer.eos_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.pad_token_id = tokenizer.pad_token_id
        generation.eos_token_id = ends[0] if len(ends) == 1 else ends
        if tokenizer.bos_token_id is not None:
            generation.bos_token_id = tokenizer.bos_token_id
