"""KL as a loss term (`--kl_loss`, k1/k2/k3) and the rollout/training mismatch (the engine's sampled
log-probs, the logged share outside [0.9, 1.1], `--rollout_is_cap`'s truncated importance sampling),
issue #29: the pure functions against reference formulas on hand-made tensors, the engines' log-probs
against the training forward's, and step 3 end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_critic_free import argv, models  # noqa: F401  (the module's saved tiny actor and reward model)
from test_hybrid_engine import EOS, PAD, engine_for, peaked_model, prompt_batch

from dschat_hal.rlhf import ppo_math
from dschat_hal.rlhf.generation.engine import HybridEngine
from dschat_hal.rlhf.generation.hf_generate import PlainGenerator
from dschat_hal.rlhf.generation.sampling import GenerationConfig
from dschat_hal.rlhf.trainer import PPOSettings, PPOTrainer, answer_logprobs
from training.step3_rlhf_finetuning.main import main as step3

LP = torch.tensor([[-1.0, -0.5, -2.0, -0.1], [-0.3, -3.0, -1.2, -0.7]])
REF = torch.tensor([[-1.2, -0.5, -1.0, -0.4], [-0.3, -2.0, -1.9, -0.2]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def reference_kl(lp: float, ref: float, estimator: str) -> float:
    """Schulman's estimators with r = p_ref / p, written out per number."""
    log_r = ref - lp
    value = {"k1": -log_r, "k2": log_r**2 / 2, "k3": math.exp(log_r) - 1 - log_r}[estimator]
    return max(-10.0, min(10.0, value))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_approx_kl_equals_the_reference_formulas(estimator):
    found = ppo_math.approx_kl(LP, REF, estimator)
    expected = torch.tensor(
        [
            [reference_kl(a, b, estimator) for a, b in zip(r1, r2, strict=True)]
            for r1, r2 in zip(LP.tolist(), REF.tolist(), strict=True)
        ]
    )
    torch.testing.assert_close(found, expected)
    assert found.dtype == torch.float32
    if estimator != "k1":
        assert (found >= 0).all()  # k2 and k3 never go negative


def test_approx_kl_clamps_and_k3_matches_k2_for_close_policies():
    far = ppo_math.approx_kl(torch.tensor([0.0, -40.0]), torch.tensor([-40.0, 0.0]), "k3")
    assert far.tolist() == [10.0, 10.0]  # log r clamped to ±20 before the exp, the estimate to ±10
    assert ppo_math.approx_kl(torch.tensor([0.0]), torch.tensor([-40.0]), "k1").item() == 10.0
    near = LP + torch.tensor([[0.02, -0.03, 0.01, -0.02], [0.03, 0.02, -0.01, 0.015]])
    k2, k3 = ppo_math.approx_kl(near, LP, "k2"), ppo_math.approx_kl(near, LP, "k3")
    torch.testing.assert_close(k3, k2, atol=0, rtol=0.05)  # k3 - k2 = O(|log r|^3)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        ppo_math.approx_kl(LP, REF, "k4")


def test_kl_loss_averages_as_the_policy_loss_and_its_gradient_flows_through_the_policy():
    lp = LP.clone().requires_grad_()
    loss = ppo_math.kl_loss(lp, REF, MASK, "k3")
    per_token = [reference_kl(LP[i, j].item(), REF[i, j].item(), "k3") for i, j in MASK.nonzero().tolist()]
    assert loss.item() == pytest.approx(sum(per_token) / len(per_token))
    constant = ppo_math.kl_loss(LP, REF, MASK, "k1", length=6)
    assert constant.item() == pytest.approx(sum((LP - REF)[MASK.bool()].tolist()) / (2 * 6))
    loss.backward()
    # d k3 / d log p = 1 - r: zero off the mask
    expected = (1 - torch.exp(REF - LP)) * MASK / MASK.sum()
    torch.testing.assert_close(lp.grad, expected)


def test_mismatch_share_and_truncated_weights_on_hand_made_ratios():
    train = torch.zeros(1, 5)
    ratios = torch.tensor([[1.0, 1.05, 1.2, 0.8, 3.0]])
    rollout = -torch.log(ratios)  # exp(train - rollout) = the ratios
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert ppo_math.mismatch_share(train, rollout, mask).item() == pytest.approx(0.5)  # 1.2 and 0.8 of 4
    weights = ppo_math.truncated_is_weights(train.requires_grad_(), rollout, 1.1)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.05, 1.1, 0.8, 1.1]]))
    assert not weights.requires_grad


def test_actor_loss_with_weights_scales_each_tokens_clipped_loss():
    old = LP - torch.tensor([[0.1, -0.3, 0.0, 0.2], [0.5, 0.0, -0.1, 0.0]])
    adv = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 0.7, 2.0, 1.0]])
    weights = torch.tensor([[0.5, 2.0, 1.0, 9.0], [1.5, 0.1, 1.0, 1.0]])
    ratio = torch.exp(LP - old)
    per_token = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    plain = ppo_math.actor_loss(LP, old, adv, MASK, 0.2)
    assert plain.item() == pytest.approx((per_token * MASK).sum().item() / MASK.sum().item())
    weighted = ppo_math.actor_loss(LP, old, adv, MASK, 0.2, weights=weights)
    assert weighted.item() == pytest.approx((per_token * weights * MASK).sum().item() / MASK.sum().item())


def test_the_trainers_policy_loss_applies_the_cap_and_the_kl_term_as_the_formulas_say():
    """A deliberately perturbed rollout log-prob: the cap weights the policy loss by min(ratio, C);
    --kl_loss adds coef x k3; without either the loss is the plain clipped surrogate."""
    start = 1
    log_probs = torch.nn.functional.pad(LP, (start, 0)).requires_grad_()
    old = log_probs.detach() - 0.05
    ref = torch.nn.functional.pad(REF, (start, 0))
    rollout = old.clone()
    rollout[0, start + 1] -= 1.0  # the engine found this token e times less likely: ratio e, capped at 2
    rollout[1, start] += 0.5  # ratio e^-0.5 (below the band, not capped)
    exp = {"action_mask": torch.nn.functional.pad(MASK, (start, 0)), "ref_logprobs": ref, "rollout_logprobs": rollout}
    adv = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 0.7, 2.0, 1.0]])

    def loss_with(**config):
        trainer = SimpleNamespace(config=PPOSettings(**config))
        return PPOTrainer.policy_loss(trainer, exp, log_probs, old, adv, start)

    plain, stats = loss_with()
    assert plain.item() == pytest.approx(ppo_math.actor_loss(LP, old[:, start:], adv, MASK, 0.2).item())
    assert stats["rollout_mismatch"].item() == pytest.approx(2 / 5)
    weights = torch.ones_like(LP)
    weights[0, 1], weights[1, 0] = 2.0, math.exp(-0.5)
    capped, _ = loss_with(rollout_is_cap=2.0)
    expected = ppo_math.actor_loss(LP, old[:, start:], adv, MASK, 0.2, weights=weights)
    assert capped.item() == pytest.approx(expected.item())
    assert capped.item() != pytest.approx(plain.item())
    with_kl, stats = loss_with(kl_loss=True, kl_estimator="k3", kl_loss_coef=0.5)
    assert with_kl.item() == pytest.approx(plain.item() + 0.5 * ppo_math.kl_loss(LP, REF, MASK, "k3").item())
    assert stats["kl_loss"].item() == pytest.approx(ppo_math.kl_loss(LP, REF, MASK, "k3").item())


@pytest.mark.parametrize("generator", ["plain", "hybrid"])
def test_the_engines_sampled_logprobs_equal_the_training_forwards_in_fp32(generator):
    model = peaked_model("opt", lora=False)
    with torch.no_grad():
        model.get_output_embeddings().weight.div_(8)  # flat enough for sampling to vary
    prompts, mask = prompt_batch(seed=3)
    config = GenerationConfig(max_answer_seq_len=10, pad_token_id=PAD, eos_token_id=EOS, return_logprobs=True)
    backend, engine = engine_for(model, 0)
    make = PlainGenerator if generator == "plain" else lambda *a: HybridEngine(*a, dtype=torch.float32)
    gen = make(engine, backend, config)
    torch.manual_seed(5)
    seq = gen.generate(prompts, mask)
    rollout = gen.rollout_logprobs
    assert rollout.shape == (3, 10) and rollout.dtype == torch.float32
    prompt_len = prompts.size(1)
    answers = ppo_math.answer_mask(seq[:, prompt_len:], EOS, PAD)
    assert (rollout[answers == 0] == 0).all() and (rollout[answers == 1] < 0).all()
    full_mask = torch.cat([mask, answers], 1)
    with torch.no_grad():
        engine.eval()
        train = answer_logprobs(engine, engine.module, seq, full_mask, prompt_len - 1)[:, prompt_len - 1 :]
    torch.testing.assert_close(train * answers, rollout, atol=1e-4, rtol=0)
    assert ppo_math.mismatch_share(train, rollout, answers).item() == 0.0


def history_of(run: dict, key: str) -> list[float]:
    return [record[key] for record in run["history"]]


def test_step3_logs_the_mismatch_without_changing_the_default_numbers(models, tmp_path):  # noqa: F811
    base = step3([*argv(models, tmp_path / "a", "--save_interval", "0"), "--max_steps", "2"])
    logged = step3(
        [*argv(models, tmp_path / "b", "--save_interval", "0"), "--max_steps", "2", "--log_rollout_mismatch"]
    )
    for key in ("actor_loss", "critic_loss", "kl", "reward"):
        assert history_of(logged, key) == history_of(base, key), key
    assert "rollout_mismatch" not in base["history"][0]
    assert all(share == 0.0 for share in history_of(logged, "rollout_mismatch"))  # fp32, same weights


def test_step3_grpo_with_kl_loss_and_the_cap_on_the_hybrid_engine(models, tmp_path):  # noqa: F811
    flags = ["--advantage_estimator", "grpo", "--n_samples_per_prompt", "2", "--kl_loss", "--kl_estimator", "k2"]
    run = step3(
        [*argv(models, tmp_path, "--save_interval", "0"), "--max_steps", "2", "--enable_hybrid_engine", *flags,
         "--rollout_is_cap", "2"]
    )  # fmt: skip
    assert run["history"]  # 2 optimizer steps: one step of 8 rows in 2 micro-batches
    assert all(math.isfinite(v) and v >= 0 for v in history_of(run, "kl_loss"))
    assert all(share == 0.0 for share in history_of(run, "rollout_mismatch"))
