"""Tokenizer and causal-LM creation: tiny built-ins, local directories and hub names."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from dschat_hal.errors import UserError
from dschat_hal.models.tiny import TOKENIZER_DIR, is_tiny, tiny_model

log = logging.getLogger(__name__)

DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout", "attention_probs_dropout_prob")


def check_model_source(name_or_path: str) -> None:
    """Fail early, in one line, on a local path that is not a saved model."""
    if is_tiny(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(
                f"model directory {path} has no config.json; point at a directory written by "
                "save_pretrained (e.g. a step-1 output), a hub name, or tiny-opt"
            )
        return
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise UserError(
            f"model path {path} is not a model directory; pass a directory written by save_pretrained, "
            "a hub name, or tiny-opt"
        )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer; one without a pad token gets its eos token as pad (said in the log)."""
    check_model_source(name_or_path)
    source = TOKENIZER_DIR if is_tiny(name_or_path) else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, fast_tokenizer=True)
    except OSError as err:
        raise UserError(
            f"cannot load a tokenizer from {name_or_path!r} ({str(err).splitlines()[0]}); "
            "pass a local model directory or tiny-opt when no model hub is reachable"
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            log.warning(
                "tokenizer of %s has no pad token: using its eos token %r as pad", name_or_path, tokenizer.eos_token
            )
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            log.warning("tokenizer of %s has no pad or eos token: added '<pad>'", name_or_path)
    tokenizer.padding_side = "right"
    return tokenizer


def add_eot_token(tokenizer: PreTrainedTokenizerBase, token: str) -> PreTrainedTokenizerBase:
    """`--add_eot_token`: register `token` as an additional special token, so text containing it
    encodes to one id that is never split; models built for the tokenizer grow their embeddings."""
    if not token:
        raise UserError("--eot_token is empty; give the end-of-text token to register (e.g. '<|endoftext|>')")
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_additional_special_tokens=False)
    return tokenizer


def padded_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(8 * math.ceil(len(tokenizer) / 8.0))


def model_family(model_or_name: Any) -> str:
    """The HF model_type (opt, bloom, llama, …) of a model, config, or name."""
    if isinstance(model_or_name, str):
        if is_tiny(model_or_name):
            return model_or_name.split("-", 1)[1]
        check_model_source(model_or_name)
        return AutoConfig.from_pretrained(model_or_name).model_type
    config = getattr(model_or_name, "config", model_or_name)
    return config.model_type


def set_dropout(config: Any, dropout: float | None) -> None:
    if dropout is None:
        return
    for key in DROPOUT_KEYS:
        if hasattr(config, key):
            setattr(config, key, dropout)


def load_pretrained(auto_class: Any, name_or_path: str, ds_config: dict | None = None, **kwargs) -> torch.nn.Module:
    """`auto_class.from_pretrained` with ZeRO-3 partitioning at load time when `ds_config` asks for it."""
    check_model_source(name_or_path)
    dschf = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        dschf = HfDeepSpeedConfig(ds_config)  # must stay alive while the model is built  # noqa: F841
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise UserError(
            f"cannot load model {name_or_path!r} ({str(err).splitlines()[0]}); "
            "pass a local directory or tiny-opt when no model hub is reachable"
        ) from None


def create_lm(
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    ds_config: dict | None = None,
    dropout: float | None = None,
    seed: int = 42,
) -> torch.nn.Module:
    """A causal LM from a tiny name (random, seeded), a local directory or a hub name.

    Pad and end tokens follow the tokenizer; the vocabulary is resized to a multiple of 8.
    """
    if is_tiny(name_or_path):
        model = tiny_model(name_or_path, padded_vocab_size(tokenizer), seed=seed, dropout=dropout)
    else:
        config = AutoConfig.from_pretrained(name_or_path)
        set_dropout(config, dropout)
        model = load_pretrained(AutoModelForCausalLM, name_or_path, ds_config, config=config)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.end_token_id = tokenizer.eos_token_id
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(padded_vocab_size(tokenizer))
    return model
