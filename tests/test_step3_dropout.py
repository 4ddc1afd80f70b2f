"""Step 3 turns dropout off by default: the old log-probs/values (eval mode) and the first PPO epoch's
new ones (train mode, same weights) agree exactly, so the ratio is 1 and nothing clips."""

from __future__ import annotations

import pytest
import torch

from dschat_hal.rlhf import engine as rlhf_engine
from dschat_hal.rlhf import ppo_math
from training.step3_rlhf_finetuning.main import main as step3

CLIPRANGE = 0.2  # step 3's default --cliprange


def tiny_step3(tmp_path, *extra: str) -> list[str]:
    """One PPO step of tiny-opt (config dropout 0.1) as actor and (random) critic, nothing saved."""
    return [
        *("--device", "cpu", "--dtype", "fp32", "--data_output_path", str(tmp_path / "cache")),
        *("--actor_model_name_or_path", "tiny-opt", "--critic_model_name_or_path", "tiny-opt", "--allow_random_critic"),
        *("--max_prompt_seq_len", "48", "--max_answer_seq_len", "8", "--num_warmup_steps", "0"),
        *("--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2"),
        *("--enable_test_mode", "--test_stop_step", "1", *extra),
    ]


def record_first_epoch(monkeypatch) -> dict:
    """Capture the four models and the first actor/critic loss inputs of the run."""
    seen: dict = {}
    actor_loss, critic_loss, init = ppo_math.actor_loss, ppo_math.critic_loss, rlhf_engine.RLHFEngine.__init__

    def recording_actor_loss(log_probs, old_log_probs, advantages, mask, cliprange, *rest, **kwargs):
        seen.setdefault("ratio", (torch.exp((log_probs - old_log_probs) * mask).detach(), mask.bool()))
        return actor_loss(log_probs, old_log_probs, advantages, mask, cliprange, *rest, **kwargs)

    def recording_critic_loss(values, old_values, returns, mask, cliprange_value):
        seen.setdefault("values", (values.detach().float(), old_values, mask.bool()))
        return critic_loss(values, old_values, returns, mask, cliprange_value)

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen["models"] = {name: getattr(self, name).module for name in ("actor", "ref", "critic", "reward")}

    monkeypatch.setattr(ppo_math, "actor_loss", recording_actor_loss)
    monkeypatch.setattr(ppo_math, "critic_loss", recording_critic_loss)
    monkeypatch.setattr(rlhf_engine.RLHFEngine, "__init__", recording_init)
    return seen


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether two train-mode forwards of the same tokens differ (OPT drops out functionally, not
    through `nn.Dropout` modules)."""
    backbone = getattr(model, "rwtransformer", model)  # critic and reward: the transformer under the head
    was_training = backbone.training
    backbone.train()
    ids = torch.arange(4, 20).unsqueeze(0)
    with torch.no_grad():
        first, second = backbone(ids)[0], backbone(ids)[0]
    backbone.train(was_training)
    return not torch.equal(first, second)


def test_tiny_opt_has_dropout_to_turn_off():
    from dschat_hal.models import create_lm, create_reward_model, load_tokenizer

    tokenizer = load_tokenizer("tiny-opt")
    assert create_lm("tiny-opt", tokenizer).config.dropout == 0.1
    assert has_dropout(create_lm("tiny-opt", tokenizer)) and has_dropout(create_reward_model("tiny-opt", tokenizer))


def test_first_ppo_epoch_ratio_is_exactly_one_with_dropout_off_by_default(tmp_path, monkeypatch):
    seen = record_first_epoch(monkeypatch)
    step3(tiny_step3(tmp_path, "--recompute_old_logprobs"))  # old log-probs from their own eval-mode forward
    for name, model in seen["models"].items():
        assert not has_dropout(model), name
    ratio, mask = seen["ratio"]
    assert mask.any() and torch.equal(ratio[mask], torch.ones_like(ratio[mask]))
    assert ((ratio - 1).abs() > CLIPRANGE)[mask].sum() == 0  # the clip fraction
    values, old_values, value_mask = seen["values"]
    assert torch.equal(values[value_mask], old_values[value_mask])


@pytest.mark.parametrize("flags", [("--actor_dropout", "0.1", "--critic_dropout", "0.1")])
def test_the_dropout_flags_still_override(tmp_path, monkeypatch, flags):
    seen = record_first_epoch(monkeypatch)
    step3(tiny_step3(tmp_path, *flags))
    for name, model in seen["models"].items():
        assert has_dropout(model), name
    ratio, mask = seen["ratio"]
    assert not torch.equal(ratio[mask], torch.ones_like(ratio[mask]))  # dropout alone moves the ratio
    values, old_values, value_mask = seen["values"]
    assert not torch.equal(values[value_mask], old_values[value_mask])
