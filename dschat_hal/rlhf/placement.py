"""Where step 3's frozen models (reference, reward) live: replicated (ZeRO-0), partitioned (ZeRO-3)
or partitioned and offloaded to host memory, decided once for the memory plan, the engines and the log.

A replicated copy costs no communication in its forward; a ZeRO-3 one all-gathers its weights layer by
layer in every experience forward. So a frozen model is replicated whenever the plan still fits with it
replicated, and partitioned only when it must be (or when asked: `--{reference,reward}_zero_stage 3`,
`--offload_{reference,reward}_model`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GiB, MiB = 1024**3, 1024**2

# frozen model -> (the trained model it copies, its stage flag, its offload flag)
FROZEN = {
    "reference": ("actor", "reference_zero_stage", "offload_reference_model"),
    "reward": ("critic", "reward_zero_stage", "offload_reward_model"),
}
STAGE_CHOICES = ("auto", "0", "3")


@dataclass(frozen=True)
class Placement:
    stage: int  # 0 (replicated) or 3 (partitioned)
    offload: bool  # ZeRO-3 parameters in host memory
    reason: str

    def describe(self, name: str, ranks: int) -> str:
        """The start-up line, e.g. 'step 3: reference replicated on every rank (ZeRO-0: ...)'."""
        where = (
            "offloaded to host memory"
            if self.offload
            else f"partitioned across {ranks} rank(s)"
            if self.stage == 3
            else "replicated on every rank"
        )
        return f"step 3: {name} {where} ({self.reason})"


def _size(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= 0.1 * GiB else f"{value / MiB:.1f} MiB"


def trained_model(args: argparse.Namespace, name: str) -> str:
    """The trained model whose ZeRO stage `name`'s placement follows: the critic for the reward, but the
    actor when a critic-free estimator builds no critic (its `--critic_zero_stage` is then unused)."""
    from dschat_hal.rlhf.advantages import has_critic

    trained = FROZEN[name][0]
    return "actor" if trained == "critic" and not has_critic(args) else trained


def _flags(args: argparse.Namespace, name: str) -> tuple[str, int, str, bool]:
    _, stage_flag, offload_flag = FROZEN[name]
    trained = trained_model(args, name)
    asked = str(getattr(args, stage_flag, None) or "auto")
    return trained, int(getattr(args, f"{trained}_zero_stage", 0) or 0), asked, bool(getattr(args, offload_flag, False))


def fixed_placement(args: argparse.Namespace, name: str) -> Placement | None:
    """The placement the flags alone decide, or None when it depends on the memory plan (auto,
    trained model ZeRO-3, no offload). Raises UserError for ZeRO-0 with offload."""
    from dschat_hal.errors import UserError

    trained, trained_stage, asked, offload = _flags(args, name)
    _, stage_flag, offload_flag = FROZEN[name]
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
            only = f"the only trained model with {args.advantage_estimator}"
            return Placement(0, False, f"ZeRO-0: the {trained}, {only}, is ZeRO-{trained_stage}")
        return Placement(0, False, f"ZeRO-0: the {trained} is ZeRO-{trained_stage}, as upstream")
    return None


def resolve_frozen_placement(
    args: argparse.Namespace, device: str | None, ranks: int, memory: float | None
) -> dict[str, Placement]:
    """Placement of "reference" and "reward". Auto with a ZeRO-3 trained model: replicated when the
    memory plan with that copy replicated still fits `memory` (both, else the reward only), else
    partitioned; with the memory unknown, partitioned (upstream's rule)."""
    fixed = {name: fixed_placement(args, name) for name in FROZEN}
    pending = [name for name, placement in fixed.items() if placement is None]
    if not pending:
        return fixed
    if memory is None or device is None:
        unknown = Placement(3, False, "ZeRO-3: device memory unknown, so upstream's rule for a ZeRO-3 model")
        return {**fixed, **dict.fromkeys(pending, unknown)}
    from dschat_hal.memory_plan.phases import _width, rlhf_plan
    from dschat_hal.memory_plan.shapes import model_shape

    width = _width(args, device)[0]
    sizes = {
        "reference": width * model_shape(args.actor_model_name_or_path, head=True).params,
        "reward": width * model_shape(args.critic_model_name_or_path, head=False).params,
    }

    def trial(replicated: set[str], why: str) -> dict[str, Placement]:
        return {
            **fixed,
            **{
                name: Placement(0, False, f"ZeRO-0: {_size(sizes[name])} fits; no gathers in its forward")
                if name in replicated
                else Placement(3, False, f"ZeRO-3: {why}; 1/{ranks} of its {_size(sizes[name])} per rank")
                for name in pending
            },
        }

    for replicated in [set(pending)] + ([{"reward"}] if len(pending) == 2 else []):
        placement = trial(replicated, "the plan does not fit with it replicated")
        if rlhf_plan(args, device, ranks, memory, placement).fits:
            return placement
    partitioned = trial(set(), "the plan does not fit with it replicated")
    if rlhf_plan(args, device, ranks, memory, partitioned).fits:
        return partitioned
    return trial(set(), "the plan does not fit even partitioned, its least")


def stored_placement(args: argparse.Namespace) -> dict[str, Placement] | None:
    """The placement step 3's main resolved and stored on `args`, if it did."""
    stored = {name: getattr(args, f"{name}_placement", None) for name in FROZEN}
    return stored if all(stored.values()) else None


def store_placement(args: argparse.Namespace, placement: dict[str, Placement]) -> None:
    """Keep `placement` on `args`, rank 0's on every rank (each rank measures its own free memory,
    and ranks that partitioned differently would wait on each other's gathers for ever)."""
    from dschat_hal.runtime import rank0s

    for name, value in rank0s(placement).items():
        setattr(args, f"{name}_placement", value)


def clear_placement(args: argparse.Namespace) -> None:
    """Drop a stored placement (a copy of `args` with other flags re-resolves it)."""
    for name in FROZEN:
        vars(args).pop(f"{name}_placement", None)


def placement_of(args: argparse.Namespace, name: str) -> Placement:
    """The stored placement of `name`, else what the flags decide with the memory unknown."""
    stored = getattr(args, f"{name}_placement", None)
    if stored is not None:
        return stored
    return fixed_placement(args, name) or Placement(3, False, "ZeRO-3: device memory unknown (upstream's rule)")
