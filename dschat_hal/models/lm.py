"""Tokenizer and causal-LM creation: tiny built-ins, local directories and hub names."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from dschat_hal.errors import UserError
from dschat_hal.models import end_tokens
from dschat_hal.models.basics import hub_reachable, set_dropout, unusable_attention
from dschat_hal.models.tiny import TOKENIZER_DIR, is_tiny, tiny_model

log = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_source(name_or_path: str, need_weights: bool = True) -> None:
    """Fail early, in one line, on a local path that is not a saved model, and on a hub name when
    no hub is reachable and the name is not in the local cache (instead of minutes of retries)."""
    if is_tiny(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        check_model_dir(path, need_weights)
        return
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(
            f"model path {path.absolute()} is not a model directory; pass a directory written by save_pretrained, "
            "a hub name, or tiny-opt"
        )
    if not hub_model_available(name_or_path):
        raise UserError(
            f"model {name_or_path!r} is neither a local directory (no {path.absolute()}) nor in the local cache, "
            "and the model hub is unreachable; pass a local model directory (e.g. a step-1 output) or tiny-opt"
        )


def check_model_dir(path: Path, need_weights: bool = True) -> None:
    """A saved model directory: a readable config.json naming a model type, and weights (when needed)."""
    config = path / "config.json"
    if not config.exists():
        raise UserError(
            f"model directory {path} has no config.json; point at a directory written by "
            "save_pretrained (e.g. a step-1 output), a hub name, or tiny-opt"
        )
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as err:
        raise UserError(f"{config} is not a valid model config ({err}); re-save the model or fix the file") from None
    if not model_type:
        raise UserError(f"{config} names no model_type; re-save the model with save_pretrained")
    if need_weights and not any((path / name).exists() for name in WEIGHT_FILES):
        raise UserError(
            f"model directory {path} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
            "the save was incomplete: save the model again"
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def hub_model_available(name: str) -> bool:
    """A hub name that can load: in the local Hugging Face cache, or the hub is reachable."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return True
    except Exception:  # an invalid repo id: let the loader report it
        return True
    return hub_reachable()


def check_positions(name_or_config: Any, length: int, flag: str, buckets: list[int] | None = None) -> None:
    """`length` tokens (and every `--bucket_lengths` entry) fit the model's position embeddings
    (models with no limit, e.g. ALiBi, pass)."""
    config = tiny_config_of(name_or_config) if isinstance(name_or_config, str) else name_or_config
    limit = next(
        (getattr(config, k) for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None)), None
    )
    if limit is not None and length > limit:
        raise UserError(f"{flag} {length} exceeds the model's {limit} positions; use at most {limit}")
    if limit is not None and buckets and max(buckets) > limit:
        raise UserError(
            f"--bucket_lengths {max(buckets)} exceeds the model's {limit} positions; use buckets of at most {limit}"
        )


def tiny_config_of(name_or_path: str) -> Any:
    """The config of a tiny name or a local/hub model (vocabulary size irrelevant here)."""
    from dschat_hal.models.tiny import TINY_MODELS, tiny_config

    if is_tiny(name_or_path):
        return tiny_config(TINY_MODELS[name_or_path], 8)
    return load_config(name_or_path)


def load_config(name_or_path: str) -> Any:
    """`AutoConfig.from_pretrained` with one-line errors."""
    check_model_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read the model config of {name_or_path!r} ({str(err).splitlines()[0]})") from None


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer with its EOS, pad and answer end ids reconciled with the model's config and
    generation config (`end_tokens.reconcile`; said in the log); one without a pad token gets its
    EOS as pad."""
    check_model_source(name_or_path, need_weights=False)
    source = TOKENIZER_DIR if is_tiny(name_or_path) else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    except (OSError, TypeError, ValueError) as err:
        local = Path(name_or_path).expanduser()
        if local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES):
            raise UserError(
                f"model directory {local} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); "
                "the save was incomplete: save the model again (with its tokenizer)"
            ) from None
        raise UserError(
            f"cannot load a tokenizer from {name_or_path!r} ({str(err).splitlines()[0]}); "
            "pass a local model directory or tiny-opt when no model hub is reachable"
        ) from None
    ends = end_tokens.reconcile(tokenizer, None if is_tiny(name_or_path) else name_or_path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            log.warning(
                "tokenizer of %s has no pad token: using its eos token %r as pad", name_or_path, tokenizer.eos_token
            )
        else:
            raise UserError(
                f"the tokenizer of {name_or_path!r} has neither a pad nor an EOS token; samples need an end "
                "token: set eos_token (and pad_token) in its tokenizer_config.json"
            )
    log.info("%s", ends)
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
        return load_config(model_or_name).model_type
    config = getattr(model_or_name, "config", model_or_name)
    return config.model_type


class _DropInitWarning(logging.Filter):
    """Drops transformers' "Some weights of X were not initialized" warning: `require_loaded` turns
    missing weights into one error line instead (and an LM head a backbone load drops is no concern)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "were not initialized from the model checkpoint" not in record.getMessage()


def from_pretrained_checked(
    auto_class: Any, name_or_path: str, ds_config: dict | None = None, **kwargs
) -> tuple[torch.nn.Module, list[str]]:
    """`auto_class.from_pretrained` with ZeRO-3 partitioning at load time when `ds_config` asks for it
    and one-line errors; returns the model and the names of the weights it did not find in the
    checkpoint (initialised, not loaded)."""
    check_model_source(name_or_path)
    dschf = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        dschf = HfDeepSpeedConfig(ds_config)  # must stay alive while the model is built  # noqa: F841
    from safetensors import SafetensorError
    from transformers.modeling_utils import logger as loading_log

    attention = kwargs.get("attn_implementation")
    quiet = _DropInitWarning()
    loading_log.addFilter(quiet)
    try:
        model, info = auto_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except OSError as err:
        raise UserError(
            f"cannot load model {name_or_path!r} ({str(err).splitlines()[0]}); "
            "pass a local directory or tiny-opt when no model hub is reachable"
        ) from None
    except (ImportError, ValueError) as err:
        refused = unusable_attention(attention, name_or_path, err)
        if refused is not None:
            raise refused from None
        if isinstance(err, ImportError):
            raise
        raise _damaged(name_or_path, err) from None
    except (SafetensorError, RuntimeError) as err:
        raise _damaged(name_or_path, err) from None
    finally:
        loading_log.removeFilter(quiet)
    return model, list(info["missing_keys"])


def _damaged(name_or_path: str, err: Exception) -> UserError:
    return UserError(
        f"the weights of {name_or_path!r} are damaged or incomplete ({str(err).splitlines()[0][:160]}); "
        "save the model again"
    )


def require_loaded(name_or_path: str, missing: list[str], what: str = "weight") -> None:
    """Refuse a model some of whose weights would start random because the checkpoint lacks them."""
    if missing:
        raise UserError(
            f"{len(missing)} {what} tensor(s) of {name_or_path!r} are not in its checkpoint and would start random "
            f"(e.g. {missing[0]}); pass a complete model directory (a causal LM or a step-2 output saved "
            "with save_pretrained)"
        )


def load_pretrained(auto_class: Any, name_or_path: str, ds_config: dict | None = None, **kwargs) -> torch.nn.Module:
    """`auto_class.from_pretrained` with ZeRO-3 partitioning at load time when `ds_config` asks for it;
    every weight of the model must come from the checkpoint (UserError otherwise)."""
    model, missing = from_pretrained_checked(auto_class, name_or_path, ds_config, **kwargs)
    require_loaded(name_or_path, missing)
    return model


def create_lm(
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    ds_config: dict | None = None,
    dropout: float | None = None,
    seed: int = 42,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """A causal LM from a tiny name (random, seeded), a local directory or a hub name.

    Pad and end tokens (config and generation config) follow the tokenizer; the vocabulary is resized to a multiple of 8.
    `attn_implementation` (eager, sdpa, ...; None: transformers' choice) picks the attention kernels.
    """
    if is_tiny(name_or_path):
        model = tiny_model(
            name_or_path,
            padded_vocab_size(tokenizer),
            seed=seed,
            dropout=dropout,
            attn_implementation=attn_implementation,
        )
    else:
        config = load_config(name_or_path)
        set_dropout(config, dropout)
        model = load_pretrained(
            AutoModelForCausalLM, name_or_path, ds_config, config=config, attn_implementation=attn_implementation
        )
    end_tokens.apply_to_model(model, tokenizer)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(padded_vocab_size(tokenizer))
    return model
