"""Step 3's run decisions, made once before any weights load and passed down as one frozen object
(`RunDecisions`): where each frozen model lives, whether the critic's graph is kept through the actor's
update, where the actor's old log-probs and the critic's old values come from, and the layer groups a
ZeRO-3 actor is gathered in for generation.

This module sits below both the memory plan and the runtime and imports neither: `decide` takes the
plan's measurements as arguments (each frozen model's bytes and a `fits` test of a trial), the memory
plan supplies them (`memory_plan.decide`), and the engines, the trainer and the generator do what the
object says.

Frozen models: a replicated copy (ZeRO-0) costs no communication in its forward; a ZeRO-3 one
all-gathers its weights layer by layer in every experience forward. So a frozen model is replicated
whenever the plan still fits with it replicated, and partitioned only when it must be (or when asked:
`--{reference,reward}_zero_stage 3`, `--offload_{reference,reward}_model`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dschat_hal.configs import Step3Config

GiB, MiB = 1024**3, 1024**2

# frozen model -> (the trained model it copies, its stage flag, its offload flag)
FROZEN = {
    "reference": ("actor", "reference_zero_stage", "offload_reference_model"),
    "reward": ("critic", "reward_zero_stage", "offload_reward_model"),
}


@dataclass(frozen=True)
class Placement:
    """Where one frozen model lives."""

    stage: int  # 0 (replicated) or 3 (partitioned)
    offload: bool  # ZeRO-3 parameters in host memory
    reason: str

    def describe(self, name: str, ranks: int, step: str = "step 3") -> str:
        """The start-up line, e.g. 'step 3: reference replicated on every rank (ZeRO-0: ...)' (`step` ''
        for the plan's note: no prefix)."""
        where = (
            "offloaded to host memory"
            if self.offload
            else f"partitioned across {ranks} rank(s)"
            if self.stage == 3
            else "replicated on every rank"
        )
        return f"{step + ': ' if step else ''}{name} {where} ({self.reason})"


UNKNOWN_MEMORY = Placement(3, False, "ZeRO-3: device memory unknown, so upstream's rule for a ZeRO-3 model")


@dataclass(frozen=True)
class RunDecisions:
    """What step 3 does, decided once (`decide`): the plan counts it, the runtime obeys it."""

    reference: Placement  # the frozen copy of the actor
    reward: Placement  # the frozen reward model
    critic: bool  # a critic is built, trained and saved (`--advantage_estimator gae`)
    # why the actor's old log-probs come from its PPO training forward (None: from an experience forward)
    old_logprobs_from_training: str | None
    # why the critic's old values come from its training forward, its graph kept through the actor's
    # update (None: from an experience forward)
    old_values_from_training: str | None
    # the flags allow the critic's old values from its training forward, but the plan does not fit with its graph kept
    critic_graph_refused: bool
    # hybrid engine, ZeRO-3 actor: layers per gather group when the whole model does not fit at once
    # (0: always all at once); the plan budgets one such group, the generator gathers all at once only
    # where the free memory it measures allows
    gather_group_layers: int

    @property
    def critic_graph_kept(self) -> bool:
        """The critic's forward runs before the actor's update and its graph is kept until its backward."""
        return self.old_values_from_training is not None

    @property
    def placements(self) -> dict[str, Placement]:
        """{"reference": ..., "reward": ...}, in that order."""
        return {name: getattr(self, name) for name in FROZEN}

    def record(self) -> dict[str, Any]:
        """The decisions as `args.json` records them beside the resolved flags."""
        return {f"{name}_placement": at for name, at in self.placements.items()} | {
            "critic_graph_kept": self.critic_graph_kept
        }


# ---- the rules the flags alone decide --------------------------------------------------------------
def _size(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= 0.1 * GiB else f"{value / MiB:.1f} MiB"


def trained_model(config: Step3Config, name: str) -> str:
    """The trained model whose ZeRO stage `name`'s placement follows: the critic for the reward, but the
    actor when a critic-free estimator builds no critic (its `--critic_zero_stage` is then unused)."""
    trained = FROZEN[name][0]
    return "actor" if trained == "critic" and not config.has_critic() else trained


def fixed_placement(config: Step3Config, name: str) -> Placement | None:
    """The placement the flags alone decide, or None when it depends on the memory plan (auto,
    trained model ZeRO-3, no offload). Raises UserError for ZeRO-0 with offload."""
    _, stage_flag, offload_flag = FROZEN[name]
    trained = trained_model(config, name)
    return placement_by_flags(
        name,
        trained,
        getattr(config, trained).zero_stage,
        getattr(config.frozen, stage_flag),
        getattr(config.frozen, offload_flag),
        config.ppo.advantage_estimator,
    )


def placement_by_flags(
    name: str, trained: str, trained_stage: int, asked: str | None, offload: bool, estimator: str = "gae"
) -> Placement | None:
    """`fixed_placement` of frozen model `name` from its flags' values: the `trained` model it follows
    and that model's ZeRO stage, its `--{name}_zero_stage` (`asked`) and `--offload_{name}_model`, and
    the `--advantage_estimator` (named where no critic leaves the reward following the actor)."""
    from dschat_hal.errors import UserError

    _, stage_flag, offload_flag = FROZEN[name]
    asked, trained_stage = str(asked or "auto"), int(trained_stage or 0)
    if offload:
        if asked == "0":
            raise UserError(
                f"--{offload_flag} offloads ZeRO-3 parameters but --{stage_flag} 0 replicates the model: "
                f"drop one of the two flags"
            )
        note = "" if trained_stage == 3 else f"; the {trained} is ZeRO-{trained_stage}, only this copy is partitioned"
        return Placement(3, True, f"ZeRO-3 + offload: --{offload_flag}{note}")
    if asked != "auto":
        stage = int(asked)
        return Placement(stage, False, f"ZeRO-{stage}: --{stage_flag} {stage}")
    if trained_stage != 3:
        if trained != FROZEN[name][0]:  # no critic: the reward follows the actor, as the reference does
            only = f"the only trained model with {estimator}"
            return Placement(0, False, f"ZeRO-0: the {trained}, {only}, is ZeRO-{trained_stage}")
        return Placement(0, False, f"ZeRO-0: the {trained} is ZeRO-{trained_stage}, as upstream")
    return None


def ppo_dropout(flag: float | None) -> float:
    """Step 3's dropout rate: the flag's when given, else 0. The old log-probs and values come from
    eval-mode forwards and the new ones from train mode, so any dropout moves the PPO ratio off 1
    (and clips) on the first epoch with unchanged weights; TRL turns dropout off for the same reason."""
    return 0.0 if flag is None else flag


def experience_rows(config: Step3Config) -> int:
    """Rows of one generation batch's experience: its prompts x `--n_samples_per_prompt`."""
    return config.engine.per_device_generation_batch_size * config.ppo.n_samples_per_prompt


def old_logprobs_from_training(config: Step3Config) -> str | None:
    """Why the actor's experience forward can be skipped, or None when it cannot.

    PPO's old log-probs are the actor's log-probs of the generated tokens under the weights that
    generated them. With one PPO epoch over one training micro-batch per generation batch, the
    training forward of that micro-batch is the first forward after generating, with the same weights
    (the optimizer steps after it), and with dropout off train mode computes what eval mode does: its
    log-probs, detached, are the old log-probs (the first ratio is exactly 1, as PPO's is). Upstream
    DeepSpeed-Chat runs a separate forward for them; skipping it saves one actor forward (a ZeRO-3
    gather) per step."""
    return _first_training_forward_sees_generation(config, config.actor.dropout)


def old_values_from_training(config: Step3Config) -> str | None:
    """Why the critic's experience forward can be skipped as far as the flags go, or None when it
    cannot: as for the actor (`old_logprobs_from_training`), the critic's training forward is its first
    forward after the experience with the same weights. It runs before the actor's update, since the
    advantages the actor's loss needs come from these values, and its graph is kept until the critic's
    backward (the memory plan counts both models' activations then, and `decide` keeps it only where
    that fits): one critic forward (a ZeRO-3 gather) less per step, and under ZeRO-3 the critic's
    forwards and backwards keep one order from step to step."""
    if not config.has_critic():
        return None
    return _first_training_forward_sees_generation(config, config.critic.dropout)


def _first_training_forward_sees_generation(config: Step3Config, dropout: float | None) -> str | None:
    ppo = config.ppo
    if ppo.recompute_old_logprobs:
        return None
    if ppo.ppo_epochs != 1 or ppo.generation_batches != 1:
        return None
    if ppo.per_device_training_batch_size < experience_rows(config):
        return None
    if ppo_dropout(dropout) != 0:
        return None
    return "one PPO epoch over one micro-batch per generation batch, dropout off"


# ---- the decision ----------------------------------------------------------------------------------
Fits = Callable[[RunDecisions], bool | None]


def decide(
    config: Step3Config,
    ranks: int,
    frozen_bytes: Mapping[str, float] | None = None,
    fits: Fits | None = None,
) -> RunDecisions:
    """Step 3's decisions from its config and the memory plan's measurements: `fits(trial)` says whether
    the plan with `trial`'s decisions fits (None: the device memory is unknown), `frozen_bytes` each
    frozen model's weights (for the log). Without `fits` the memory is unknown.

    Frozen models, auto with a ZeRO-3 trained model: replicated when the plan with that copy replicated
    still fits (both, else the reward only), else partitioned; with the memory unknown, partitioned
    (upstream's rule). Then, with that placement, the critic's graph is kept where the flags allow it
    (`old_values_from_training`) and the plan still fits with it (unknown memory: it is kept)."""
    base = RunDecisions(
        reference=UNKNOWN_MEMORY,
        reward=UNKNOWN_MEMORY,
        critic=config.has_critic(),
        old_logprobs_from_training=old_logprobs_from_training(config),
        old_values_from_training=None,
        critic_graph_refused=False,
        gather_group_layers=int(config.engine.tp_gather_partition_size or 0),
    )
    placed = dataclasses.replace(base, **_place_frozen(config, ranks, base, frozen_bytes, fits))
    values = old_values_from_training(config)
    if values is None:
        return placed
    kept = dataclasses.replace(placed, old_values_from_training=values)
    if fits is not None and fits(kept) is False:
        return dataclasses.replace(placed, critic_graph_refused=True)
    return kept


def _place_frozen(
    config: Step3Config,
    ranks: int,
    base: RunDecisions,
    frozen_bytes: Mapping[str, float] | None,
    fits: Fits | None,
) -> dict[str, Placement]:
    """Placement of "reference" and "reward" (`decide`), tried with the critic's graph not kept."""
    fixed = {name: fixed_placement(config, name) for name in FROZEN}
    pending = [name for name, placement in fixed.items() if placement is None]
    if not pending:
        return fixed
    if fits is None or frozen_bytes is None:
        return {**fixed, **dict.fromkeys(pending, UNKNOWN_MEMORY)}

    def trial(replicated: set[str], why: str) -> dict[str, Placement]:
        return {
            **fixed,
            **{
                name: Placement(0, False, f"ZeRO-0: {_size(frozen_bytes[name])} fits; no gathers in its forward")
                if name in replicated
                else Placement(3, False, f"ZeRO-3: {why}; 1/{ranks} of its {_size(frozen_bytes[name])} per rank")
                for name in pending
            },
        }

    for replicated in [set(pending)] + ([{"reward"}] if len(pending) == 2 else []):
        placement = trial(replicated, "the plan does not fit with it replicated")
        if fits(dataclasses.replace(base, **placement)):
            return placement
    partitioned = trial(set(), "the plan does not fit with it replicated")
    if fits(dataclasses.replace(base, **partitioned)):
        return partitioned
    return trial(set(), "the plan does not fit even partitioned, its least")


def unplanned_decisions(config: Step3Config, ranks: int | None = None) -> RunDecisions:
    """The decisions for a step-3 config (`configs.Step3Config`) of a pipeline built in Python that ran no
    memory plan: the flags' rules with the device memory unknown (frozen models of a ZeRO-3 run
    partitioned, as upstream), over `ranks` (default: the world size)."""
    if ranks is None:
        import torch.distributed as dist

        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return decide(config, ranks)
