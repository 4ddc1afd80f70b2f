"""PPO maths on hand-made tensors, each against a plain reference."""

from __future__ import annotations

import torch

from dschat_hal.rlhf import ppo_math


def test_rewards_are_kl_penalty_plus_clipped_score_on_last_answer_token():
    log_probs = torch.tensor([[0.0, -1.0, -2.0, -1.0, -1.0, -1.0]])
    ref_log_probs = torch.tensor([[0.0, -1.5, -1.0, -1.0, -3.0, -1.0]])
    action_mask = torch.tensor([[1, 1, 1, 1, 0, 0]])  # answer targets at positions 2, 3
    rewards = ppo_math.compute_rewards(
        log_probs, ref_log_probs, torch.tensor([7.0]), action_mask, start=2, kl_ctl=0.1, clip_reward_value=5.0
    )
    expected = torch.tensor([[0.0, 0.0, -0.1 * (-2.0 + 1.0), 0.0 + 5.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_negative_score_is_clipped_and_zero_length_answer_gets_it_at_start():
    rewards = ppo_math.compute_rewards(
        torch.zeros(1, 4),
        torch.zeros(1, 4),
        torch.tensor([-9.0]),
        torch.tensor([[1, 1, 1, 0]]),
        start=1,
        kl_ctl=0.1,
        clip_reward_value=2.0,
    )
    assert torch.allclose(rewards, torch.tensor([[0.0, 0.0, -2.0, 0.0]]))


def gae_loop(values, rewards, start, gamma, lam):
    advantages, last = [], 0.0
    length = rewards.size(1)
    for t in reversed(range(start, length)):
        next_value = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages.append(last)
    advantages = torch.stack(advantages[::-1], dim=1)
    return advantages, advantages + values[:, start:]


def test_gae_matches_the_direct_loop():
    torch.manual_seed(0)
    values, rewards = torch.randn(3, 9), torch.randn(3, 9)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (0.99, 1.0)):
        got = ppo_math.gae(values, rewards, 2, gamma, lam)
        want = gae_loop(values, rewards, 2, gamma, lam)
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)


def test_values_and_rewards_after_the_end_do_not_leak():
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0, 9.0]])
    rewards = torch.tensor([[0.0, 1.0, 1.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    adv_masked, _ = ppo_math.gae(values * mask, rewards * mask, 0, 1.0, 0.95)
    adv_trunc, _ = ppo_math.gae(values[:, :3], rewards[:, :3], 0, 1.0, 0.95)
    assert torch.allclose(adv_masked[:, :3], adv_trunc)


def test_answer_mask_keeps_first_eos_and_drops_the_rest():
    eos, pad = 2, 0
    answers = torch.tensor([[5, 6, eos, pad, pad], [5, eos, 7, eos, pad], [5, 6, 7, 8, 9]])
    assert ppo_math.answer_mask(answers, eos, pad).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    same = torch.tensor([[5, eos, eos, eos]])  # pad == eos (llama-style tokenizers)
    assert ppo_math.answer_mask(same, eos, eos).tolist() == [[1, 1, 0, 0]]


def test_actor_loss_is_clipped_and_masked():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 3.0]]))
    advantages = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[1, 1, 0]])
    # position 0: ratio 1.5, A>0 -> min(1.5, 1.2)*1 = 1.2 ; position 1: ratio .5, A<0 -> -max(.5*-1... ) -> loss .8
    expected = (-1.2 + 0.8) / 2
    assert torch.allclose(ppo_math.actor_loss(new, old, advantages, mask, 0.2), torch.tensor(expected))


def test_critic_loss_takes_the_larger_of_clipped_and_unclipped_error():
    values = torch.tensor([[1.0, 0.0, 5.0]])
    old_values = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # pos0: unclipped 0, clipped (0.2-1)^2=.64 -> .64 ; pos1: both (0-2)^2=4 -> 4
    assert torch.allclose(
        ppo_math.critic_loss(values, old_values, returns, mask, 0.2), torch.tensor(0.5 * (0.64 + 4) / 2)
    )


def test_adaptive_kl_controller_moves_towards_target():
    controller = ppo_math.AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert controller.update(2.0, 10) > 0.1
    controller = ppo_math.AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert controller.update(0.1, 10) < 0.1


def test_end_score_of_an_answer_cut_at_max_answer_seq_len_without_eos():
    """An answer that fills --max_answer_seq_len with no EOS is scored at its last token (the last
    position of the sequence), one that ends with EOS at its EOS; the clipped score lands there."""
    from dschat_hal.models import create_reward_model, load_tokenizer

    tokenizer = load_tokenizer("tiny-opt")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = create_reward_model("tiny-opt", tokenizer, seed=3).eval()
    prompts = torch.tensor([[pad, 11, 12, 13], [14, 15, 16, 17]])
    prompt_mask = (prompts != pad).long()
    max_answer = 5
    answers = torch.tensor([[21, 22, 23, 24, 25], [26, 27, eos, pad, pad]])  # row 0: cut, no EOS
    seq = torch.cat([prompts, answers], dim=1)
    mask = torch.cat([prompt_mask, ppo_math.answer_mask(answers, eos, pad)], dim=1)
    with torch.no_grad():
        values = model.forward_value(seq, mask, return_value_only=True)
        end_scores = model.forward_value(seq, mask)["chosen_end_scores"]
    last = []
    for row in range(seq.size(0)):  # plain loop: the last position the mask keeps
        last.append(max(t for t in range(seq.size(1)) if mask[row, t] == 1))
    assert last == [prompts.size(1) + max_answer - 1, prompts.size(1) + 2]
    assert torch.allclose(end_scores, torch.stack([values[r, t] for r, t in enumerate(last)]))

    start = prompts.size(1) - 1
    rewards = ppo_math.compute_rewards(
        torch.zeros(2, seq.size(1) - 1), torch.zeros(2, seq.size(1) - 1), end_scores, mask[:, 1:], start, 0.1, 5.0
    )
    for row, t in enumerate(last):  # log-prob position t - 1 scores token t
        expected = torch.zeros(seq.size(1) - 1)
        expected[t - 1] = end_scores[row].clamp(-5.0, 5.0)
        assert torch.allclose(rewards[row], expected)
