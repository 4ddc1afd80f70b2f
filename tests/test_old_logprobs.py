"""Where the actor's old log-probs and the critic's old values come from (issue #21): the training
forwards when they see the weights of the experience (one PPO epoch over one micro-batch, dropout off),
else experience forwards (the actor's on the hybrid engine's kept gathered copy under ZeRO-3). Each source
gives what the separate ZeRO forward gives."""

from __future__ import annotations

import types

import pytest
import torch

from dschat_hal.configs import RLHFModelConfig, Step3Config, with_flags
from dschat_hal.decisions import old_logprobs_from_training, old_values_from_training
from dschat_hal.models.reward_model import RewardModel
from dschat_hal.rlhf.generation.engine import HybridEngine
from dschat_hal.rlhf.trainer import PPOTrainer, lm_inputs
from training.step3_rlhf_finetuning.main import main as step3


def tiny_step3(tmp_path, *extra: str) -> list[str]:
    """Two PPO steps of tiny-opt in fp32 (exact comparisons), nothing saved."""
    return [
        *("--device", "cpu", "--dtype", "fp32", "--data_output_path", str(tmp_path / "cache"), "--seed", "7"),
        *("--actor_model_name_or_path", "tiny-opt", "--critic_model_name_or_path", "tiny-opt", "--allow_random_critic"),
        *("--max_prompt_seq_len", "32", "--max_answer_seq_len", "8", "--num_warmup_steps", "0"),
        *("--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2"),
        *("--actor_learning_rate", "1e-3", "--critic_learning_rate", "1e-3"),
        *("--enable_test_mode", "--test_stop_step", "2", "--log_interval", "1", *extra),
    ]


def count_experience_forwards(monkeypatch) -> list[int]:
    calls = [0]
    original = PPOTrainer._experience_logprobs

    def counted(self, seq, mask, start):
        calls[0] += 1
        return original(self, seq, mask, start)

    monkeypatch.setattr(PPOTrainer, "_experience_logprobs", counted)
    return calls


def flags(**overrides) -> Step3Config:
    """A step-3 config with these flags' values."""
    base = dict(
        ppo_epochs=1,
        generation_batches=1,
        per_device_generation_batch_size=4,
        per_device_training_batch_size=4,
        actor_dropout=None,
        critic_dropout=None,
    )
    return with_flags(Step3Config(models=RLHFModelConfig("tiny-opt", "tiny-opt")), {**base, **overrides})


def test_the_training_forward_gives_the_old_logprobs_only_when_it_sees_the_generating_weights():
    assert old_logprobs_from_training(flags()) is not None
    assert old_logprobs_from_training(flags(per_device_training_batch_size=8)) is not None
    assert old_logprobs_from_training(flags(actor_dropout=0.0)) is not None
    for unsafe in (
        flags(ppo_epochs=2),  # the second epoch sees updated weights
        flags(generation_batches=2),  # the second batch trains after the first one's step
        flags(per_device_training_batch_size=2),  # two micro-batches: the second after a step
        flags(actor_dropout=0.1),  # train mode would drop out: not the eval-mode log-probs
    ):
        assert old_logprobs_from_training(unsafe) is None, unsafe
    assert old_logprobs_from_training(flags(recompute_old_logprobs=True)) is None


def test_the_critic_training_forward_gives_the_old_values_only_when_it_sees_the_experience_weights():
    assert old_values_from_training(flags()) is not None
    assert old_values_from_training(flags(actor_dropout=0.1)) is not None  # the actor's dropout is not the critic's
    for unsafe in (
        flags(ppo_epochs=2),
        flags(generation_batches=2),
        flags(per_device_training_batch_size=2),
        flags(critic_dropout=0.1),
        flags(recompute_old_logprobs=True),
    ):
        assert old_values_from_training(unsafe) is None, unsafe


def count_critic_forwards(monkeypatch) -> dict[str, int]:
    """Critic value forwards by mode (the reward model's scoring forward is not counted)."""
    calls = {"eval": 0, "train": 0}
    original = RewardModel.forward_value

    def counted(self, input_ids, attention_mask, return_value_only=False):
        if return_value_only:
            calls["train" if self.training else "eval"] += 1
        return original(self, input_ids, attention_mask, return_value_only)

    monkeypatch.setattr(RewardModel, "forward_value", counted)
    return calls


def test_training_without_the_experience_forward_equals_training_with_it(tmp_path, monkeypatch):
    calls, critic = count_experience_forwards(monkeypatch), count_critic_forwards(monkeypatch)
    reused = step3(tiny_step3(tmp_path / "a"))["history"]
    assert calls[0] == 0  # no actor forward in the experience phase
    assert critic == {"eval": 0, "train": 2}  # nor a critic one: one training forward per step
    separate = step3(tiny_step3(tmp_path / "b", "--recompute_old_logprobs"))["history"]
    assert calls[0] == 2  # one per step
    assert critic == {"eval": 2, "train": 4}
    assert len(reused) == len(separate) == 2
    for a, b in zip(reused, separate, strict=True):
        for key in ("reward", "actor_loss", "critic_loss", "kl", "advantage"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert reused[1]["kl"] != 0.0  # the second step's actor had moved: the comparison is not vacuous


def test_a_deferred_experience_is_refused_where_the_training_forward_cannot_give_it():
    exp = {"seq": torch.zeros(2, 6, dtype=torch.long)}  # no "logprobs": left to the training forward
    stub = types.SimpleNamespace(_timings_at_last_step={})
    with pytest.raises(ValueError, match="one PPO epoch"):
        PPOTrainer.train_on(stub, [exp], [None], ppo_epochs=2, batch_size=2, unsup_coef=0.0)
    with pytest.raises(ValueError, match="one PPO epoch"):
        PPOTrainer.train_on(stub, [exp], [None], ppo_epochs=1, batch_size=1, unsup_coef=0.0)


@pytest.mark.parametrize("lora", [False, True], ids=["dense", "lora"])
def test_zero3_experience_logprobs_on_the_kept_copy_equal_the_zero3_forward(tmp_path, monkeypatch, lora):
    seen: list[tuple[bool, float]] = []
    original = PPOTrainer._experience_logprobs

    def compared(self, seq, mask, start):
        from dschat_hal.rlhf import ppo_math

        form = self.generator.kept_form()
        on_copy = original(self, seq, mask, start)
        logits = self.actor(**lm_inputs(self.actor.module, seq, mask)).logits  # the ZeRO-3 forward (gathers)
        through_zero3 = ppo_math.logprobs_of_labels(logits[:, :-1], seq[:, 1:])[:, start:]
        seen.append((form is not None, (on_copy[:, start:] - through_zero3).abs().max().item()))
        return on_copy

    monkeypatch.setattr(PPOTrainer, "_experience_logprobs", compared)
    extra = ["--actor_lora_dim", "4"] if lora else []
    argv = tiny_step3(tmp_path, "--recompute_old_logprobs", "--enable_hybrid_engine", *extra)
    argv += ["--actor_zero_stage", "3", "--critic_zero_stage", "3"]
    step3(argv)
    assert len(seen) == 2 and all(used_copy for used_copy, _ in seen), seen
    assert max(diff for _, diff in seen) < 1e-5, seen


def test_the_kept_form_is_only_a_copy_kept_between_phases():
    model = torch.nn.Linear(2, 2)
    kept = types.SimpleNamespace(copy=types.SimpleNamespace(model=model), unpin=False, fallback_reason=None)
    assert HybridEngine.kept_form(kept) is model
    for case in (
        dict(copy=None),  # not ZeRO-3: the actor's own module, no gather to save
        dict(copy=types.SimpleNamespace(model=None)),  # released
        dict(unpin=True),  # --unpin_actor_parameters frees it after each phase
        dict(fallback_reason="HF generate"),
    ):
        assert HybridEngine.kept_form(types.SimpleNamespace(**{**vars(kept), **case})) is None, case


@pytest.mark.parametrize("family", ["opt", "bloom", "llama"])
def test_answer_logprobs_equal_the_full_logits_and_leave_no_hook(family):
    from dschat_hal.models import create_lm, load_tokenizer
    from dschat_hal.rlhf import ppo_math
    from dschat_hal.rlhf.trainer import answer_logprobs

    torch.manual_seed(0)
    model = create_lm(f"tiny-{family}", load_tokenizer(f"tiny-{family}")).float().eval()
    seq = torch.randint(3, 100, (3, 20))
    mask = torch.ones_like(seq)
    mask[0, :4] = 0  # left padding
    start = 11
    with torch.no_grad():
        full = ppo_math.logprobs_of_labels(model(**lm_inputs(model, seq, mask)).logits[:, :-1], seq[:, 1:])
        answer = answer_logprobs(model, model, seq, mask, start)
        logits_after = model(**lm_inputs(model, seq, mask)).logits
    assert answer.shape == full.shape and torch.equal(answer[:, :start], torch.zeros_like(answer[:, :start]))
    torch.testing.assert_close(answer[:, start:], full[:, start:], atol=1e-5, rtol=0)
    assert logits_after.size(1) == seq.size(1)  # the head sees every position again afterwards
