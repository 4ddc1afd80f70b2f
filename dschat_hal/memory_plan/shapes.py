"""Model shapes for the plan: parameter counts from a meta-device build, sizes from the config."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shape:
    """What the plan needs of one model: counts from its meta-device build, sizes from its config."""

    name: str
    family: str
    params: int
    largest_layer: int  # DeepSpeed's "largest layer": the most parameters one module holds directly
    layer_params: int  # parameters inside the transformer layers (the part TP splits)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    eager_attention: bool  # attention probabilities materialised (s² per head) instead of SDPA
    linears: tuple[tuple[str, int, int, bool], ...] = field(repr=False)  # (name, in, out, bias)

    def lora(self, module_name: str, dim: int) -> tuple[int, int]:
        """(LoRA factor parameters added, base parameters LoRA freezes) for `--lora_module_name`, `--lora_dim`."""
        if dim <= 0:
            return 0, 0
        hits = [(i, o, b) for name, i, o, b in self.linears if module_name in name]
        return sum(dim * (i + o) for i, o, _ in hits), sum(i * o + (o if b else 0) for i, o, b in hits)


def _config(name_or_path: str):
    from dschat_hal.models.lm import padded_vocab_size
    from dschat_hal.models.tiny import TINY_MODELS, is_tiny, tiny_config

    if is_tiny(name_or_path):  # the bundled tokenizer's size (load_tokenizer would log its end tokens again)
        from transformers import AutoTokenizer

        from dschat_hal.models.tiny import TOKENIZER_DIR

        return tiny_config(TINY_MODELS[name_or_path], padded_vocab_size(AutoTokenizer.from_pretrained(TOKENIZER_DIR)))
    from transformers import AutoConfig

    from dschat_hal.errors import UserError
    from dschat_hal.models.lm import check_model_source

    check_model_source(name_or_path, need_weights=False)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read the model config of {name_or_path!r} ({str(err).splitlines()[0]})") from None


def _first(config, *keys: str, default=None):
    return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), default)


@functools.lru_cache(maxsize=8)
def meta_model(name_or_path: str, head: bool = True):
    """A causal LM (`head`) or its backbone built on the meta device from its config: no storage."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    config = _config(name_or_path)
    with torch.device("meta"):  # shapes only; unlike accelerate's init_empty_weights, tied heads stay one tensor
        return (AutoModelForCausalLM if head else AutoModel).from_config(config)


@functools.lru_cache(maxsize=32)
def tp_fallback_reason(name_or_path: str, tp_size: int) -> str | None:
    """Why the hybrid engine generates at T = 1 for `--inference_tp_size tp_size` on this actor (None:
    it shards): the engine's own decision (`models.capabilities.tp_unsupported_reason`) on the meta build."""
    if tp_size <= 1:
        return None
    from dschat_hal.models.capabilities import tp_unsupported_reason

    return tp_unsupported_reason(meta_model(name_or_path, head=True), tp_size)


@functools.lru_cache(maxsize=32)
def model_shape(name_or_path: str, head: bool = True) -> Shape:
    """The shape of a causal LM (`head`) or of a reward model (backbone + value head)."""
    import torch

    model = meta_model(name_or_path, head)
    config = model.config  # as the model resolved it (its attention implementation included)
    unique = {id(p): p.numel() for p in model.parameters()}
    params = sum(unique.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    layer_params = sum(p.numel() for n, p in model.named_parameters() if re.search(r"\.\d+\.", n))
    linears = tuple(
        (n, m.in_features, m.out_features, m.bias is not None)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    if not head:  # the reward model's value head (hidden -> 1, no bias)
        value_in = _first(config, "word_embed_proj_dim", "hidden_size", "n_embd")
        params += value_in
        linears += (("v_head", value_in, 1, False),)
    attn = getattr(config, "_attn_implementation", None) or "eager"
    return Shape(
        name=name_or_path,
        family=config.model_type,
        params=params,
        largest_layer=largest,
        layer_params=layer_params,
        layers=_first(config, "num_hidden_layers", "n_layer", "num_layers"),
        hidden=hidden,
        heads=heads,
        kv_heads=_first(config, "num_key_value_heads", "multi_query_group_num", default=heads),
        head_dim=_first(config, "head_dim", default=hidden // heads),
        intermediate=_first(config, "intermediate_size", "ffn_dim", "n_inner", default=None) or 4 * hidden,
        vocab=model.get_input_embeddings().num_embeddings,
        gated_mlp=config.model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"),
        eager_attention=attn == "eager",
        linears=linears,
    )
