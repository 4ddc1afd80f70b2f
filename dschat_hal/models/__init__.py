"""Models: causal LMs, reward/critic models, LoRA, tiny built-ins and checkpointing."""

from dschat_hal.models.checkpoint import atomic_directory, gathered_state_dict, save_lm, write_lm
from dschat_hal.models.lm import check_model_source, check_positions, create_lm, load_tokenizer, model_family
from dschat_hal.models.reward_model import (
    RewardModel,
    create_reward_model,
    is_reward_checkpoint,
    require_reward_checkpoint,
)

__all__ = [
    "RewardModel",
    "atomic_directory",
    "check_model_source",
    "check_positions",
    "create_lm",
    "create_reward_model",
    "gathered_state_dict",
    "is_reward_checkpoint",
    "load_tokenizer",
    "model_family",
    "require_reward_checkpoint",
    "save_lm",
    "write_lm",
]
