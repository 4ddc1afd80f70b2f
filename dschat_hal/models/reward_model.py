"""Reward model and critic: a transformer backbone with a scalar value head.

All index arithmetic is done with masks (no `nonzero()` / `.item()`), so shapes stay static and the
step never waits on the host — what graph-compiling devices need, and harmless elsewhere.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dschat_hal.models import end_tokens
from dschat_hal.models.checkpoint import atomic_directory, gathered_state_dict, save_tokenizer
from dschat_hal.models.lm import (
    from_pretrained_checked,
    load_config,
    load_pretrained,
    padded_vocab_size,
    require_loaded,
    set_dropout,
)
from dschat_hal.models.tiny import is_tiny, tiny_model

log = logging.getLogger(__name__)

HEAD_FILE = "value_head.safetensors"  # the head of the first format (backbone saved as `AutoModel`)
MARKER_FILE = "reward_model.json"


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last nonzero entry of each row of a 0/1 mask (0 for an all-zero row)."""
    positions = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    return (positions * mask.long()).max(dim=-1).values


def first_true_index(mask: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """Index of the first True of each row, or `default` where a row has none."""
    length = mask.size(-1)
    positions = torch.arange(length, device=mask.device).expand_as(mask)
    first = torch.where(mask, positions, torch.full_like(positions, length)).min(dim=-1).values
    return torch.where(first == length, default, first)


def pairwise_loss(
    chosen_values: torch.Tensor,
    rejected_values: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    chosen_ids: torch.Tensor,
    rejected_ids: torch.Tensor,
) -> torch.Tensor:
    """Mean over pairs of −logσ(v_chosen − v_rejected), averaged from the divergence point to the end.

    The span starts at the first token where the two sequences differ and ends at the later of the
    two ends; identical pairs use their last token only (as upstream DeepSpeed-Chat does).
    """
    chosen_end = chosen_mask.long().sum(-1)
    rejected_end = rejected_mask.long().sum(-1)
    end = torch.maximum(chosen_end, rejected_end)
    positions = torch.arange(chosen_ids.size(-1), device=chosen_ids.device).expand_as(chosen_ids)
    differs = (chosen_ids != rejected_ids) & (positions < end.unsqueeze(-1))
    start = first_true_index(differs, default=end - 1)
    span = ((positions >= start.unsqueeze(-1)) & (positions < end.unsqueeze(-1))).float()
    per_token = -F.logsigmoid(chosen_values.float() - rejected_values.float())
    return ((per_token * span).sum(-1) / span.sum(-1).clamp(min=1)).mean()


class RewardModel(nn.Module):
    """Backbone + `v_head`. `forward` trains on stacked [chosen; rejected] pairs; `forward_value`
    gives per-token values and the end score (value at the last real token)."""

    def __init__(self, backbone: nn.Module, compute_fp32_loss: bool = False) -> None:
        super().__init__()
        self.config = backbone.config
        hidden = getattr(self.config, "word_embed_proj_dim", None) or self.config.hidden_size
        self.v_head = nn.Linear(hidden, 1, bias=False)
        self.rwtransformer = backbone
        self.compute_fp32_loss = compute_fp32_loss
        self.score_mean: float | None = None  # mean training score (step 2 --center_reward), saved with the model

    def gradient_checkpointing_enable(self) -> None:
        self.rwtransformer.gradient_checkpointing_enable()

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.rwtransformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        values = self.v_head(hidden).squeeze(-1)
        return values.float() if self.compute_fp32_loss else values

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        scoring: bool = False,
        return_value_only: bool = False,
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """The pairwise loss over stacked [chosen; rejected]; `scoring`: what `forward_value` returns,
        through the module call (see `score`)."""
        if scoring:
            return self.forward_value(input_ids, attention_mask, return_value_only)
        values = self.values(input_ids, attention_mask)
        half = input_ids.size(0) // 2
        chosen_mask, rejected_mask = attention_mask[:half], attention_mask[half:]
        loss = pairwise_loss(
            values[:half], values[half:], chosen_mask, rejected_mask, input_ids[:half], input_ids[half:]
        )
        scores = values.gather(-1, last_true_index(attention_mask).unsqueeze(-1)).squeeze(-1)
        return {"loss": loss, "chosen_mean_scores": scores[:half], "rejected_mean_scores": scores[half:]}

    def forward_value(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_value_only: bool = False
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        values = self.values(input_ids, attention_mask)
        if return_value_only:
            return values
        end_scores = values.gather(-1, last_true_index(attention_mask).unsqueeze(-1)).squeeze(-1)
        return {"values": values, "chosen_end_scores": end_scores}

    # ---- persistence ------------------------------------------------------------------------
    def save(
        self, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, is_writer: bool = True
    ) -> None:
        """Save atomically: backbone in HF format, the head beside it (collective under ZeRO-3)."""
        with atomic_directory(out_dir, enabled=is_writer) as tmp:
            self.write(tmp, tokenizer)

    def write(self, directory: Path | None, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Write into `directory` (None on ranks that do not write, which keep nothing of what they
        gather; collective under ZeRO-3).

        Where transformers has a `*ForSequenceClassification` class for the backbone (OPT, BLOOM,
        Llama, GPT-NeoX, ...), the model is saved as one with one label (`score.weight` = `v_head`)
        and the pad id in its config, so `AutoModelForSequenceClassification` loads it with the
        trained head and scores the last non-pad token, as `forward_value` does. Otherwise the
        backbone is saved as `AutoModel` with the head in `value_head.safetensors`."""
        state = gathered_state_dict(self, keep=directory is not None)
        if directory is None:
            return
        backbone_state = {
            k.removeprefix("rwtransformer."): v for k, v in state.items() if k.startswith("rwtransformer.")
        }
        head = state["v_head.weight"].contiguous()
        classifier = sequence_classifier(self.config, self.rwtransformer, head)
        weights = None
        if classifier is not None:
            prefix = classifier.base_model_prefix
            weights = {f"{prefix}.{k}": v for k, v in backbone_state.items()} | {"score.weight": head}
            if not set(classifier.state_dict()) <= weights.keys():
                weights = None  # an unusual layout: keep the first format
        if weights is not None:
            pad = self.config.pad_token_id if tokenizer is None else tokenizer.pad_token_id
            classifier.config.pad_token_id = pad
            if tokenizer is not None and pad in end_tokens.answer_end_ids(tokenizer):
                log.warning(
                    "the pad token (id %d) also ends answers: transformers' sequence classification skips it "
                    "at a sequence's end and scores the token before; give the tokenizer its own pad token "
                    "for the same end scores as ours",
                    pad,
                )
            classifier.save_pretrained(directory, state_dict=weights, safe_serialization=True)
        else:
            self.rwtransformer.save_pretrained(directory, state_dict=backbone_state, safe_serialization=True)
            save_file({"weight": head}, str(Path(directory) / HEAD_FILE))
        marker = {"format": "dschat_hal.RewardModel", "version": 2 if weights is not None else 1}
        if self.score_mean is not None:
            marker["score_mean"] = self.score_mean
        (Path(directory) / MARKER_FILE).write_text(json.dumps(marker) + "\n")
        if tokenizer is not None:
            save_tokenizer(tokenizer, self.rwtransformer, directory)


def sequence_classifier(config: PretrainedConfig, backbone: nn.Module, head: torch.Tensor) -> PreTrainedModel | None:
    """An empty (meta-device) one-label `*ForSequenceClassification` of `config` built around
    `backbone`'s class with a `score` head shaped as `head`; None where transformers has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    try:
        cls = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    except (KeyError, ValueError):
        return None
    config = copy.deepcopy(config)
    config.num_labels = 1
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as err:  # a class that cannot be built from this config: keep the first format
        log.debug("no %s for the reward model (%s)", cls.__name__, err)
        return None
    inner, score_layer = getattr(model, model.base_model_prefix, None), getattr(model, "score", None)
    if (
        type(inner) is not type(backbone)
        or not isinstance(score_layer, nn.Linear)
        or score_layer.bias is not None
        or score_layer.weight.shape != head.shape
    ):
        return None
    return model.to(head.dtype)


def score(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_value_only: bool = False):
    """`RewardModel.forward_value` of a reward model or of the engine around one, called as the module
    so its forward hooks run: DeepSpeed's ZeRO-3 closes a step's parameter trace in a pre-hook of the
    wrapped module's forward, and without it (`engine.forward_value(...)`, as upstream calls the critic)
    the trace never completes, so each backward gathers the whole model again and nothing is prefetched."""
    return model(input_ids, attention_mask, scoring=True, return_value_only=return_value_only)


def reset_final_norm(model: RewardModel) -> tuple[str, ...]:
    """Bloom: re-initialise the final layer norm `ln_f` before training a new value head on it.

    Pretrained bloom's `ln_f.weight` has a large variance, which makes bf16 reward training hard; as
    the head it fed is replaced anyway, upstream DeepSpeed-Chat (and HabanaAI's fork) reset it to
    ones/zeros. Returns the reset parameters' names, to keep them trainable under LoRA-only training.
    """
    norm = getattr(model.rwtransformer, "ln_f", None)
    if model.config.model_type != "bloom" or norm is None:
        return ()
    import deepspeed

    params = [norm.weight, norm.bias]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=hasattr(norm.weight, "ds_id")):
        with torch.no_grad():
            norm.weight.fill_(1.0)
            norm.bias.zero_()
    return ("rwtransformer.ln_f.",)


def stored_score_mean(path: str | Path) -> float | None:
    """The mean training score step 2 stored with a reward model (`--center_reward`), else None."""
    marker = Path(path) / MARKER_FILE
    if not marker.exists():
        return None
    value = json.loads(marker.read_text()).get("score_mean")
    return None if value is None else float(value)


def is_sequence_classifier(path: str | Path) -> bool:
    """A local directory holding a one-label `*ForSequenceClassification` (our save, or TRL's, OpenRLHF's...)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # a broken config.json is reported by the model loader
    if not isinstance(data, dict):
        return False
    labels = data.get("num_labels") or len(data.get("id2label") or {}) or 2  # transformers' default: 2
    return labels == 1 and any(str(a).endswith("ForSequenceClassification") for a in data.get("architectures") or ())


def is_reward_checkpoint(path: str | Path) -> bool:
    """A reward model or critic: ours in either format (value head file, or sequence classifier)."""
    return (Path(path) / HEAD_FILE).exists() or is_sequence_classifier(path)


def require_reward_checkpoint(name_or_path: str) -> None:
    """Step 3's critic must start from step 2's output: a local directory needs the value head."""
    from dschat_hal.errors import UserError
    from dschat_hal.models.lm import check_model_source

    check_model_source(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not is_reward_checkpoint(path):
        raise UserError(
            f"--critic_model_name_or_path {path} is not a step-2 reward model (no {HEAD_FILE} and no one-label "
            "*ForSequenceClassification config); run step 2 first and pass its --output_dir"
        )


def load_sequence_classifier(
    name_or_path: str, config: PretrainedConfig, ds_config: dict | None = None, **kwargs
) -> tuple[nn.Module, torch.Tensor]:
    """The backbone and the `score` weight of a one-label `*ForSequenceClassification` directory,
    every tensor loaded from the checkpoint (partitioned at load time under a ZeRO-3 `ds_config`)."""
    import deepspeed

    from dschat_hal.errors import UserError

    model, missing = from_pretrained_checked(
        AutoModelForSequenceClassification, name_or_path, ds_config, config=config, **kwargs
    )
    require_loaded(name_or_path, missing, "reward model")
    backbone, layer = getattr(model, model.base_model_prefix, None), getattr(model, "score", None)
    if not isinstance(backbone, nn.Module) or not isinstance(layer, nn.Linear) or layer.bias is not None:
        raise UserError(
            f"{name_or_path} is a {type(model).__name__} without a bias-free `score` layer, which a value head "
            "needs; pass a step-2 output or a reward model saved as a one-label sequence classifier"
        )
    with deepspeed.zero.GatheredParameters([layer.weight], enabled=hasattr(layer.weight, "ds_id")):
        head = layer.weight.detach().cpu().clone()
    del model, layer  # the classifier object goes; the backbone module stays
    return backbone, head


def saved_value_head(path: str | Path) -> torch.Tensor:
    """The value head (`v_head.weight`, shape [1, hidden]) stored in a reward model directory, either format."""
    path = Path(path)
    if (path / HEAD_FILE).exists():
        return load_file(str(path / HEAD_FILE))["weight"]
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    name = json.loads(index.read_text())["weight_map"]["score.weight"] if index.exists() else "model.safetensors"
    with safe_open(str(path / name), framework="pt") as weights:
        return weights.get_tensor("score.weight")


def backbone_class(config: PretrainedConfig) -> type | None:
    """The class `AutoModel` builds for `config` (the transformer without a head), if any."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(config)]
    except (KeyError, ValueError):
        return None


def load_backbone(name_or_path: str, config: PretrainedConfig, ds_config: dict | None = None, **kwargs) -> nn.Module:
    """The backbone (`AutoModel`'s class) of a saved model, every weight loaded from the checkpoint.

    A saved backbone (a step-2 output, or any `AutoModel` save) loads as itself. A causal LM loads
    whole and gives up its backbone module: the checkpoint's keys follow the causal-LM class, which
    `AutoModel` cannot always map (Gemma-3's empty `base_model_prefix` matched none of `model.*`).
    The LM head goes with the causal-LM object (a tied head is the backbone's embedding). Under a
    ZeRO-3 `ds_config` the backbone is partitioned at load time, as any model.
    """
    base = backbone_class(config)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    saved_backbone = (
        base is None
        or base.__name__ in (config.architectures or ())
        or is_reward_checkpoint(name_or_path)
        or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING
    )
    if not saved_backbone:
        lm, missing = from_pretrained_checked(AutoModelForCausalLM, name_or_path, ds_config, config=config, **kwargs)
        found = next(((n, m) for n, m in lm.named_modules() if n and isinstance(m, base)), None)
        if found is not None:
            prefix, backbone = found
            del lm  # the head (untied: a vocabulary-sized matrix) is freed here
            inside = [k.removeprefix(prefix + ".") for k in missing if k.startswith(prefix + ".")]
            require_loaded(name_or_path, inside, "backbone")
            return backbone
        del lm  # an unusual layout: load the backbone class directly (its loading is checked below)
    return load_pretrained(AutoModel, name_or_path, ds_config, config=config, **kwargs)


def create_reward_model(
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    ds_config: dict | None = None,
    dropout: float | None = None,
    compute_fp32_loss: bool = False,
    seed: int = 42,
    attn_implementation: str | None = None,
) -> RewardModel:
    """A reward model (or critic): from a step-2 checkpoint (head included; either format, or any
    one-label `*ForSequenceClassification`), or a fresh head on a
    backbone taken from a tiny name, a causal-LM directory or a hub name (see `load_backbone`);
    `attn_implementation` (eager, sdpa, ...; None: transformers' choice) picks the attention kernels."""
    if is_tiny(name_or_path):
        backbone = tiny_model(
            name_or_path,
            padded_vocab_size(tokenizer),
            seed=seed,
            head=False,
            dropout=dropout,
            attn_implementation=attn_implementation,
        )
        head = None
    else:
        config = load_config(name_or_path)
        set_dropout(config, dropout)
        head_file = Path(name_or_path) / HEAD_FILE  # the first format's head (older outputs)
        if is_sequence_classifier(name_or_path) and not head_file.exists():
            backbone, head = load_sequence_classifier(
                name_or_path, config, ds_config, attn_implementation=attn_implementation
            )
        else:
            backbone = load_backbone(name_or_path, config, ds_config, attn_implementation=attn_implementation)
            head = load_file(str(head_file))["weight"] if head_file.exists() else None
    end_tokens.apply_to_model(backbone, tokenizer)
    if backbone.get_input_embeddings().num_embeddings < len(tokenizer):
        backbone.resize_token_embeddings(padded_vocab_size(tokenizer))
    model = RewardModel(backbone, compute_fp32_loss=compute_fp32_loss)
    # A bf16 checkpoint loaded under ZeRO-3 (zero.Init) stays bf16; the new head must match it, since
    # DeepSpeed's ZeRO-3 optimizer flattens all trainable parameters into one buffer of one dtype.
    model.v_head.to(next(backbone.parameters()).dtype)
    if head is not None:
        with torch.no_grad():
            model.v_head.weight.copy_(head.to(model.v_head.weight.dtype))
        model.score_mean = stored_score_mean(name_or_path)
    return model
