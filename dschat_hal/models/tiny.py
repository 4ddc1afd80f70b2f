"""Tiny random-weight models and the bundled tokenizer, for CPU runs with no model hub."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BloomConfig, LlamaConfig, OPTConfig, PretrainedConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
DATA_DIR = ASSETS / "data"

HIDDEN, LAYERS, HEADS, MAX_POSITIONS = 64, 2, 4, 512


def tiny_config(family: str, vocab_size: int) -> PretrainedConfig:
    """A 2-layer, 64-wide config of `family` (opt | bloom | llama)."""
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            word_embed_proj_dim=HIDDEN,
            ffn_dim=4 * HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "bloom":
        return BloomConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(f"unknown tiny model family {family!r}; use tiny-opt, tiny-bloom or tiny-llama")


TINY_MODELS = {f"tiny-{family}": family for family in ("opt", "bloom", "llama")}


def is_tiny(name: str) -> bool:
    return name in TINY_MODELS


def tiny_model(
    name: str,
    vocab_size: int,
    seed: int = 42,
    head: bool = True,
    dropout: float | None = None,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Random-weight tiny model, seeded; `head=False` returns the backbone (for reward models)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from dschat_hal.models.basics import set_dropout, unusable_attention

    config = tiny_config(TINY_MODELS[name], vocab_size)
    set_dropout(config, dropout)  # before construction: modules copy their dropout rate from the config
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            return (AutoModelForCausalLM if head else AutoModel).from_config(
                config, attn_implementation=attn_implementation
            )
        except (ImportError, ValueError) as err:
            refused = unusable_attention(attn_implementation, name, err)
            if refused is None:
                raise
            raise refused from None
