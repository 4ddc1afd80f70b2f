"""PPO trainer: generate experience with the actor, score it, and update actor and critic (or, with a
critic-free advantage estimator, the actor alone: `advantages.py`).

Every device decision goes through the `accel` backend: `mark_step` around each forward and after
backward/step (HPU lazy mode), static generation length, and the generation context.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from accel import Accelerator
from dschat_hal.configs import KL_LOSS_DEFAULTS, Step3Config
from dschat_hal.decisions import RunDecisions
from dschat_hal.models.end_tokens import answer_end_ids
from dschat_hal.models.reward_model import score
from dschat_hal.rlhf import advantages as critic_free
from dschat_hal.rlhf import ppo_math
from dschat_hal.rlhf.engine import RLHFEngine
from dschat_hal.rlhf.generation.decode import contiguous_head_input
from dschat_hal.rlhf.generation.hf_generate import PlainGenerator
from dschat_hal.rlhf.generation.sampling import GenerationConfig
from dschat_hal.rlhf.reward_shaping import RewardShaper, clipped_share, whiten


@dataclass
class PPOSettings:
    """What the trainer runs with, resolved (DeepSpeed-Chat's defaults): PPO's knobs from step 3's
    config (`from_config`), and what was decided from them and the models (the reward model's stored
    mean score, which old log-probs and values come from the training forwards)."""

    max_answer_seq_len: int = 256
    kl_ctl: float = 0.1
    clip_reward_value: float = 5.0
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    greedy: bool = False  # upstream DeepSpeed-Chat decodes greedily; PPO usually samples
    target_kl: float | None = None
    # reward remedies (reward_shaping.py), off as upstream: subtract this score, running mean/std, whitening
    reward_center: float | None = None
    normalize_reward: bool = False
    whiten_advantages: bool = False
    # the actor's old log-probs from its PPO training forward instead of an experience forward (the run's
    # decision, `dschat_hal.decisions`): exact when that forward sees the weights that generated
    old_logprobs_from_training: bool = False
    # the critic's old values likewise from its training forward (`old_values_from_training`)
    old_values_from_training: bool = False
    # gae (PPO with the critic) or a critic-free estimator (advantages.py), over N answers per prompt
    advantage_estimator: str = "gae"
    n_samples_per_prompt: int = 1
    dr_grpo: bool = False  # grpo without the std division, constant-length loss average
    # the KL to the reference as a loss term (estimator k1/k2/k3, `ppo_math.kl_loss`) instead of in the reward
    kl_loss: bool = False
    kl_estimator: str = "k3"
    kl_loss_coef: float = 0.001
    # the engine's log-probs of the tokens it sampled: the training/rollout mismatch is logged, and with
    # `rollout_is_cap` the policy loss is weighted by min(p_train / p_rollout, cap) (truncated IS)
    rollout_logprobs: bool = False
    rollout_is_cap: float | None = None
    # fp16: both backwards before either optimizer step (upstream's order)
    align_overflow: bool = False

    @classmethod
    def from_config(
        cls,
        config: Step3Config,
        *,
        reward_center: float | None = None,
        decisions: RunDecisions | None = None,
    ) -> PPOSettings:
        """The settings of step 3's `config`. `reward_center`: the score to subtract, with
        `ppo.center_reward` (`reward_model.stored_score_mean`). `decisions` (the engine's, `RLHFEngine.decisions`)
        say where the old log-probs and values come from; without them every experience forward runs, as
        upstream's."""
        ppo, engine = config.ppo, config.engine
        old_logprobs_from_training = decisions is not None and decisions.old_logprobs_from_training is not None
        old_values_from_training = decisions is not None and decisions.critic_graph_kept
        return cls(
            max_answer_seq_len=engine.max_answer_seq_len,
            kl_ctl=ppo.kl_ctl,
            clip_reward_value=ppo.clip_reward_value,
            cliprange=ppo.cliprange,
            cliprange_value=ppo.cliprange_value,
            gamma=ppo.gamma,
            lam=ppo.lam,
            temperature=engine.temperature,
            greedy=engine.greedy_generation,
            target_kl=ppo.target_kl,
            reward_center=reward_center,
            normalize_reward=ppo.normalize_reward,
            whiten_advantages=ppo.whiten_advantages,
            old_logprobs_from_training=old_logprobs_from_training,
            old_values_from_training=old_values_from_training,
            advantage_estimator=ppo.advantage_estimator,
            n_samples_per_prompt=ppo.n_samples_per_prompt,
            dr_grpo=ppo.dr_grpo,
            kl_loss=ppo.kl_loss,
            kl_estimator=ppo.kl_estimator or KL_LOSS_DEFAULTS["kl_estimator"],
            kl_loss_coef=KL_LOSS_DEFAULTS["kl_loss_coef"] if ppo.kl_loss_coef is None else ppo.kl_loss_coef,
            rollout_logprobs=ppo.log_rollout_mismatch,
            rollout_is_cap=ppo.rollout_is_cap,
            align_overflow=ppo.align_overflow,
        )


@contextlib.contextmanager
def greedy_decoding(generator) -> Iterator[None]:
    """`generator` (plain, hybrid or tensor-parallel) decodes greedily inside the block."""
    config = generator.config
    generator.config = dataclasses.replace(config, do_sample=False)
    try:
        yield
    finally:
        generator.config = config


def generation_config(config: PPOSettings, tokenizer) -> GenerationConfig:
    return GenerationConfig(
        max_answer_seq_len=config.max_answer_seq_len,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=answer_end_ids(tokenizer),
        do_sample=not config.greedy,
        temperature=config.temperature,
        return_logprobs=config.rollout_logprobs or config.rollout_is_cap is not None,
    )


@functools.cache
def _accepts_position_ids(model_class: type) -> bool:
    return "position_ids" in inspect.signature(model_class.forward).parameters


def lm_inputs(model: torch.nn.Module, seq: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward kwargs with positions that skip left padding (as `generate` computes them)."""
    inputs = {"input_ids": seq, "attention_mask": mask, "use_cache": False}
    if _accepts_position_ids(type(model)):
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return inputs


@functools.cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@contextlib.contextmanager
def head_on_last(module: torch.nn.Module, keep: int) -> Iterator[dict[str, int]]:
    """Apply the LM head to the last `keep` positions only: forward kwargs for models that take
    `logits_to_keep`, else a pre-hook on the output layer that slices its input for the block."""
    if _accepts_logits_to_keep(type(module)):
        with contiguous_head_input(module):
            yield {"logits_to_keep": keep}
        return
    head = module.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _, args: (args[0][:, -keep:].contiguous(), *args[1:]))
    try:
        yield {}
    finally:
        handle.remove()


def answer_logprobs(model, module: torch.nn.Module, seq: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    """log p(seq[:, t + 1]) at every t >= `start` (zeros before), with the output head computed on the
    answer positions only: PPO reads no prompt log-prob, and the head over a vocabulary (with its
    fp32 log-softmax) is a large share of the forward. `model` is what is called (an engine or a plain
    copy), `module` the causal LM inside it."""
    keep = seq.size(1) - start
    with head_on_last(module, keep) as extra:
        logits = model(**lm_inputs(module, seq, mask), **extra).logits
    log_probs = ppo_math.logprobs_of_labels(logits[:, -keep:-1], seq[:, start + 1 :])
    return torch.nn.functional.pad(log_probs, (start, 0))


class PPOTrainer:
    """Step 3's loop body: `generate_experience` on a prompt batch, then `train_rlhf` (or `train_on`)."""

    def __init__(
        self, engine: RLHFEngine, backend: Accelerator, tokenizer, config: PPOSettings, generator=None
    ) -> None:
        """`config`: `PPOSettings.from_config(step3_config, ...)`. `generator` makes the answers
        (`hf_generate.PlainGenerator` when not given, or a `HybridEngine`)."""
        self.rlhf, self.backend, self.tokenizer, self.config = engine, backend, tokenizer, config
        self.actor, self.ref, self.critic, self.reward = engine.actor, engine.ref, engine.critic, engine.reward
        self.kl_controller = (
            ppo_math.AdaptiveKLController(config.kl_ctl, config.target_kl) if config.target_kl else None
        )
        self.generator = generator or PlainGenerator(engine.actor, backend, generation_config(config, tokenizer))
        self.align_overflow = config.align_overflow
        self.shape_reward = RewardShaper(config.reward_center, config.normalize_reward)
        self.timings: dict[str, float] = {"generation": 0.0, "experience": 0.0, "training": 0.0}
        self._timings_at_last_step = dict(self.timings)
        self.last_experience: dict[str, torch.Tensor] = {}

    @property
    def kl_ctl(self) -> float:
        return self.kl_controller.value if self.kl_controller else self.config.kl_ctl

    @property
    def reward_kl_ctl(self) -> float:
        """The KL coefficient in the reward: none when the KL is a loss term (`--kl_loss`)."""
        return 0.0 if self.config.kl_loss else self.kl_ctl

    # ---- experience ------------------------------------------------------------------------
    @torch.no_grad()
    def generate_sequence(self, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Answers for a prompt batch, padded to exactly prompt length + max_answer_seq_len."""
        return self.generator.generate(prompts, prompt_mask)

    @torch.no_grad()
    def generate_experience(self, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generate, then score with all four models (three without a critic). Answers of ≤ 1 token get
        an all-zero mask. With N answers per prompt each prompt is repeated N times (its answers are
        contiguous rows); ReMax adds one greedy answer per prompt, scored as its baseline."""
        start = time.time()
        n, greedy_seq = self.config.n_samples_per_prompt, None
        unique_prompts, unique_mask = prompts, prompt_mask
        if n > 1:
            prompts, prompt_mask = prompts.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
        seq = self.generate_sequence(prompts, prompt_mask)
        rollout = getattr(self.generator, "rollout_logprobs", None)  # before ReMax's greedy answers replace it
        if self.config.advantage_estimator == "remax":  # the baseline, in the same phase (fixed shapes: padded rows)
            with greedy_decoding(self.generator):
                greedy_seq = self.generate_sequence(unique_prompts, unique_mask)
        generated = time.time()
        self.actor.eval()
        if self.critic is not None:
            self.critic.eval()
        prompt_len = prompts.size(1)
        answers = ppo_math.answer_mask(seq[:, prompt_len:], answer_end_ids(self.tokenizer), self.tokenizer.pad_token_id)
        usable = (answers.sum(-1, keepdim=True) > 1).long()
        mask = torch.cat([prompt_mask, answers], dim=1)
        for name in ("actor", "ref", "critic", "reward") if self.critic is not None else ("actor", "ref", "reward"):
            self.backend.audit_shape(name, seq)
        self.backend.mark_step()
        logprobs = (
            None if self.config.old_logprobs_from_training else self._experience_logprobs(seq, mask, prompt_len - 1)
        )
        self.backend.mark_step()
        ref_logprobs = answer_logprobs(self.ref, self.ref.module, seq, mask, prompt_len - 1)
        self.backend.mark_step()
        values = None if self.config.old_values_from_training or self.critic is None else self._critic_values(seq, mask)
        self.backend.mark_step()
        reward = score(self.reward, seq, mask)["chosen_end_scores"]
        self.backend.mark_step()
        if self.critic is None:
            shaped, scores = self._sequence_scores(reward, greedy_seq, unique_mask)
            extra = {"sequence_scores": scores}
        else:
            shaped, extra = self.shape_reward(reward), {}
        action_mask = mask[:, 1:] * torch.cat([torch.ones_like(prompt_mask[:, 1:]), usable.expand_as(answers)], dim=1)
        self.timings["generation"] += generated - start
        self.timings["experience"] += time.time() - generated
        self.last_experience = {
            "prompts": prompts,
            "seq": seq,
            "attention_mask": mask,
            "action_mask": action_mask,
            **({} if logprobs is None else {"logprobs": logprobs}),  # else from the training forward
            # the engine's, indexed as the log-probs (position t scores token t + 1)
            **({} if rollout is None else {"rollout_logprobs": torch.nn.functional.pad(rollout, (prompt_len - 1, 0))}),
            "ref_logprobs": ref_logprobs,
            **({} if values is None else {"value": values.float()}),  # else from the training forward
            "rewards": shaped,  # what PPO clips and uses
            "raw_rewards": reward.float(),
            "answer_length": answers.sum(-1),
            **extra,
        }
        return self.last_experience

    def _sequence_scores(
        self, reward: torch.Tensor, greedy_seq: torch.Tensor | None, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Critic-free: (shaped rewards, each row's sequence-level score b_i) from the rewards shaped and
        clipped as PPO's are (`advantages.sequence_scores`); ReMax's greedy answers (one per prompt) are
        scored and shaped with the sampled ones."""
        cfg, n = self.config, self.config.n_samples_per_prompt
        baseline = None
        if greedy_seq is not None:
            prompt_len = prompt_mask.size(1)
            answers = ppo_math.answer_mask(
                greedy_seq[:, prompt_len:], answer_end_ids(self.tokenizer), self.tokenizer.pad_token_id
            )
            greedy_reward = score(self.reward, greedy_seq, torch.cat([prompt_mask, answers], dim=1))[
                "chosen_end_scores"
            ]
            self.backend.mark_step()
            shaped = self.shape_reward(torch.cat([reward.float(), greedy_reward.float()]))
            shaped, baseline = shaped[: reward.size(0)], shaped[reward.size(0) :].repeat_interleave(n)
            baseline = baseline.clamp(-cfg.clip_reward_value, cfg.clip_reward_value)
        else:
            shaped = self.shape_reward(reward)
        clipped = shaped.clamp(-cfg.clip_reward_value, cfg.clip_reward_value)
        return shaped, critic_free.sequence_scores(
            cfg.advantage_estimator, clipped, n, std_normalize=not cfg.dr_grpo, baseline=baseline
        )

    def _critic_values(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The critic's value at every position but the last (in its current train/eval mode)."""
        return score(self.critic, seq, mask, return_value_only=True)[:, :-1]

    def _experience_logprobs(self, seq: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        """The actor's log-probs of `seq`: on the hybrid engine's kept gathered copy under ZeRO-3 (the
        same weights, no second gather), else through the actor's engine."""
        form = self.generator.kept_form()
        model = form if form is not None else self.actor
        return answer_logprobs(model, self.actor.module, seq, mask, start)

    # ---- training ----------------------------------------------------------------------------
    def train_rlhf(self, exp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One PPO update of actor and critic on an experience batch; returns detached stats."""
        if self.critic is None:
            return self.train_actor(exp)
        started = time.time()
        self.actor.train()
        self.critic.train()
        cfg = self.config
        start = exp["prompts"].size(1) - 1
        seq, mask, action_mask = exp["seq"], exp["attention_mask"], exp["action_mask"]
        answer_mask = action_mask[:, start:]
        self.backend.audit_shape("actor_train", seq)
        # values first when they are also the old values: the advantages below need them
        values = None if "value" in exp else self._critic_values(seq, mask)
        log_probs = answer_logprobs(self.actor, self.actor.module, seq, mask, start)
        old_logprobs = exp["logprobs"] if "logprobs" in exp else log_probs.detach()
        with torch.no_grad():
            old_values = (exp["value"] if values is None else values.float()) * action_mask
            rewards = ppo_math.compute_rewards(
                old_logprobs,
                exp["ref_logprobs"],
                exp["rewards"],
                action_mask,
                start,
                self.reward_kl_ctl,
                cfg.clip_reward_value,
            )
            advantages, returns = ppo_math.gae(old_values, rewards, start, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:  # after the returns are taken, as TRL does
                advantages = whiten(advantages, answer_mask)

        actor_loss, extra = self.policy_loss(exp, log_probs, old_logprobs, advantages, start)
        self.actor.backward(actor_loss)
        self.backend.mark_step()
        if not self.align_overflow:
            self.actor.step()
            self.backend.mark_step()

        if values is None:
            values = self._critic_values(seq, mask)
        critic_loss = ppo_math.critic_loss(
            values[:, start:], old_values[:, start:], returns, answer_mask, cfg.cliprange_value
        )
        self.critic.backward(critic_loss)
        self.backend.mark_step()
        if self.align_overflow:  # both backwards done before either steps (upstream's order)
            self.actor.step()
            self.backend.mark_step()
        self.critic.step()
        self.backend.mark_step()
        self.timings["training"] += time.time() - started
        kl = ppo_math.masked_mean(old_logprobs[:, start:] - exp["ref_logprobs"][:, start:], answer_mask)
        return {
            "actor_loss": actor_loss.detach(),
            "critic_loss": critic_loss.detach(),
            "kl": kl.detach(),
            "advantage": ppo_math.masked_mean(advantages, answer_mask).detach(),
            **extra,
        }

    def policy_loss(
        self,
        exp: dict[str, torch.Tensor],
        log_probs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        start: int,
        length: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The actor's loss and its extra statistics: the clipped surrogate, weighted by truncated
        importance sampling with `rollout_is_cap` (the engine's log-probs against the old ones, which
        are the training forward's under the weights that sampled), plus the KL loss term with
        `kl_loss`; the share of answer tokens whose training/rollout ratio lies outside [0.9, 1.1] when
        the engine's log-probs are kept."""
        cfg, stats = self.config, {}
        answer_mask = exp["action_mask"][:, start:]
        weights = None
        if "rollout_logprobs" in exp:
            rollout = exp["rollout_logprobs"][:, start:]
            stats["rollout_mismatch"] = ppo_math.mismatch_share(old_logprobs[:, start:], rollout, answer_mask)
            if cfg.rollout_is_cap is not None:
                weights = ppo_math.truncated_is_weights(old_logprobs[:, start:], rollout, cfg.rollout_is_cap)
        loss = ppo_math.actor_loss(
            log_probs[:, start:], old_logprobs[:, start:], advantages, answer_mask, cfg.cliprange, length, weights
        )
        if cfg.kl_loss:
            kl_term = ppo_math.kl_loss(
                log_probs[:, start:], exp["ref_logprobs"][:, start:], answer_mask, cfg.kl_estimator, length
            )
            stats["kl_loss"] = kl_term.detach()
            loss = loss + cfg.kl_loss_coef * kl_term
        return loss, stats

    def critic_free_advantages(
        self, experiences: list[dict[str, torch.Tensor]], old_logprobs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each experience's token advantages (`advantages.token_advantages`) from its sequence scores
        and KL penalties; REINFORCE++ whitens them over all of them together and over ranks."""
        from dschat_hal.runtime import all_reduce_mean

        cfg, found = self.config, []
        for exp, logprobs in zip(experiences, old_logprobs, strict=True):
            start = exp["prompts"].size(1) - 1
            found.append(
                critic_free.token_advantages(
                    logprobs,
                    exp["ref_logprobs"],
                    exp["sequence_scores"],
                    exp["action_mask"],
                    start,
                    self.reward_kl_ctl,
                    cfg.gamma,
                )
            )
        if cfg.advantage_estimator == "reinforce_pp":
            masks = [exp["action_mask"][:, exp["prompts"].size(1) - 1 :] for exp in experiences]
            found = critic_free.whiten_batch(found, masks, all_reduce_mean)
        return found

    def train_actor(self, exp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Critic-free: one clipped-surrogate update of the actor with the estimator's advantages (taken
        from `exp`, else computed here from this micro-batch: then it is the whole step's batch)."""
        started = time.time()
        self.actor.train()
        cfg = self.config
        start = exp["prompts"].size(1) - 1
        seq, mask, action_mask = exp["seq"], exp["attention_mask"], exp["action_mask"]
        answer_mask = action_mask[:, start:]
        self.backend.audit_shape("actor_train", seq)
        log_probs = answer_logprobs(self.actor, self.actor.module, seq, mask, start)
        old_logprobs = exp["logprobs"] if "logprobs" in exp else log_probs.detach()
        with torch.no_grad():
            advantages = (
                exp["advantages"] if "advantages" in exp else self.critic_free_advantages([exp], [old_logprobs])[0]
            )
            if cfg.whiten_advantages:
                advantages = whiten(advantages, answer_mask)
        length = cfg.max_answer_seq_len if cfg.dr_grpo else None
        actor_loss, extra = self.policy_loss(exp, log_probs, old_logprobs, advantages, start, length)
        self.actor.backward(actor_loss)
        self.backend.mark_step()
        self.actor.step()
        self.backend.mark_step()
        self.timings["training"] += time.time() - started
        kl = ppo_math.masked_mean(old_logprobs[:, start:] - exp["ref_logprobs"][:, start:], answer_mask)
        return {
            "actor_loss": actor_loss.detach(),
            "kl": kl.detach(),
            "advantage": ppo_math.masked_mean(advantages, answer_mask).detach(),
            **extra,
        }

    def train_unsupervised(self, batch: dict[str, torch.Tensor], unsup_coef: float) -> torch.Tensor:
        """The ptx term: an LM loss on unsupervised text, scaled by `unsup_coef`. Its backward is
        accumulated with the PPO micro-batch's (the actor engine accumulates twice as many
        micro-batches when ptx is on), so the pair makes one actor optimizer step."""
        logits = self.actor(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        loss = self.backend.lm_loss(logits, batch["labels"], fp32=True)
        self.actor.backward(unsup_coef * loss)
        self.backend.mark_step()
        self.actor.step()
        self.backend.mark_step()
        return loss.detach()

    def describe_sample(self, exp: dict[str, torch.Tensor]) -> str:
        """The first prompt and answer of an experience batch, decoded."""
        prompt_len = exp["prompts"].size(1)
        decode = self.tokenizer.decode
        return (
            f"  prompt: {decode(exp['seq'][0, :prompt_len], skip_special_tokens=True)}\n"
            f"  answer: {decode(exp['seq'][0, prompt_len:], skip_special_tokens=True)}"
        )

    def train_on(
        self, experiences: list[dict], unsup_batches: list, ppo_epochs: int, batch_size: int, unsup_coef: float
    ) -> dict[str, torch.Tensor | float]:
        """PPO epochs over collected experience, cut into training micro-batches. Each micro-batch
        is paired with a slice of its generation batch's ptx batch (when on), and the actor EMA is
        updated after it, as upstream does. Returns this step's statistics as device tensors (no host
        sync), except the host timings; only the adaptive KL controller, when on, reads the KL back
        every step."""
        timings_before = dict(self._timings_at_last_step)
        critic_free = "sequence_scores" in experiences[0]  # critic-free experience carries no values
        deferred = any("logprobs" not in exp or ("value" not in exp and not critic_free) for exp in experiences)
        if deferred and (ppo_epochs != 1 or len(experiences) != 1 or experiences[0]["seq"].size(0) > batch_size):
            raise ValueError(
                "the old log-probs or values were left to the training forwards, which give them only for one PPO "
                "epoch over one micro-batch per generation batch (see dschat_hal.decisions.old_logprobs_from_training)"
            )
        if critic_free and not deferred:  # the step's advantages, before any update (REINFORCE++ pools them)
            with torch.no_grad():
                found = self.critic_free_advantages(experiences, [exp["logprobs"] for exp in experiences])
            experiences = [{**exp, "advantages": adv} for exp, adv in zip(experiences, found, strict=True)]
        stats = []
        for _ in range(ppo_epochs):
            for exp, unsup in zip(experiences, unsup_batches, strict=True):
                starts = range(0, exp["seq"].size(0), batch_size)
                unsup_slices = split_rows(unsup, len(starts)) if unsup is not None else [None] * len(starts)
                for i, unsup_slice in zip(starts, unsup_slices, strict=True):
                    stats.append(self.train_rlhf({k: v[i : i + batch_size] for k, v in exp.items()}))
                    if unsup_slice is not None:
                        stats[-1]["unsup_loss"] = self.train_unsupervised(unsup_slice, unsup_coef)
                    self.rlhf.update_ema()
        lengths = torch.cat([e["answer_length"] for e in experiences]).float()
        record: dict[str, torch.Tensor | float] = {key: torch.stack([s[key] for s in stats]).mean() for key in stats[0]}
        scores = torch.cat([e["rewards"] for e in experiences])
        clip = self.config.clip_reward_value
        record.update(
            reward=torch.cat([e["raw_rewards"] for e in experiences]).mean(),
            reward_used=scores.clamp(-clip, clip).mean(),
            clipped=clipped_share(scores, clip),
            answer_length=lengths.mean(),
            short_answers=(lengths <= 1).float().mean(),
            kl_ctl=self.kl_ctl,
            samples=float(lengths.numel()),  # this rank's answers (rows) in the step
            generated_tokens=lengths.sum(),  # this rank's generated answer tokens
        )
        if self.kl_controller is not None:
            from dschat_hal.runtime import all_reduce_mean

            self.kl_controller.update(all_reduce_mean(record["kl"]).item(), len(stats))
        record.update({f"{phase}_s": self.timings[phase] - timings_before.get(phase, 0.0) for phase in self.timings})
        self._timings_at_last_step = dict(self.timings)
        return record


def split_rows(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """`batch` cut into `parts` row slices of near-equal size. With fewer rows than parts (an epoch's last
    ptx batch, smaller than the others) each slice is one row, the rows reused in turn: every PPO
    micro-batch keeps its ptx backward, which the actor's doubled accumulation counts on."""
    rows = next(iter(batch.values())).size(0)
    if rows == 0:
        raise ValueError(f"an empty ptx batch cannot be split across {parts} PPO micro-batches")
    if rows < parts:
        return [{key: value[i % rows : i % rows + 1] for key, value in batch.items()} for i in range(parts)]
    pieces = {key: torch.tensor_split(value, parts) for key, value in batch.items()}
    return [{key: pieces[key][i] for key in batch} for i in range(parts)]


def materialize(record: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Read a step's statistics back to the host, averaged over ranks (a host sync)."""
    from dschat_hal.runtime import all_reduce_mean

    return {k: all_reduce_mean(v).item() if isinstance(v, torch.Tensor) else float(v) for k, v in record.items()}
