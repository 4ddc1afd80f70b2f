"""How many optimizer steps step 3 takes: the length of the actor's and critic's LR schedules.

Every generation batch is cut into PPO micro-batches of `--per_device_training_batch_size` rows;
each micro-batch is one backward of the actor and one of the critic (plus one ptx backward of the
actor, accumulated into the same actor step), and DeepSpeed steps every
`--gradient_accumulation_steps` micro-batches. Only whole groups of `--generation_batches`
batches are trained; a group may span two epochs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dschat_hal.configs import Step3Config


def batch_sizes(rows: int, batch_size: int, drop_last: bool) -> list[int]:
    """The sizes of a loader's batches over `rows` rows (this rank's share)."""
    sizes = [batch_size] * (rows // batch_size)
    if rows % batch_size and not drop_last:
        sizes.append(rows % batch_size)
    return sizes


def ppo_micro_batches(
    generation_batch_sizes: list[int],
    training_batch_size: int,
    epochs: int,
    generation_batches: int,
    ppo_epochs: int,
) -> int:
    """PPO micro-batches (actor/critic backwards) over the whole run."""
    per_batch = [math.ceil(size / training_batch_size) for size in generation_batch_sizes] * epochs
    trained = len(per_batch) - len(per_batch) % generation_batches
    return ppo_epochs * sum(per_batch[:trained])


def planned_optimizer_steps(micro_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps DeepSpeed takes over `micro_batches` accumulated micro-batches."""
    return micro_batches // gradient_accumulation_steps


def step3_plan(config: Step3Config, prompt_loader, unsup_loader=None) -> tuple[int, int]:
    """(PPO micro-batches, planned optimizer steps) of a step-3 run with these loaders."""
    ppo, schedule = config.ppo, config.schedule
    sizes = batch_sizes(len(prompt_loader.sampler), prompt_loader.batch_size, prompt_loader.drop_last)
    if unsup_loader is not None:  # generation batches are zipped with ptx batches: the shorter ends the epoch
        sizes = sizes[: len(unsup_loader)]
    sizes = [size * ppo.n_samples_per_prompt for size in sizes]  # N answers per prompt
    micro = ppo_micro_batches(
        sizes, ppo.per_device_training_batch_size, schedule.num_train_epochs, ppo.generation_batches, ppo.ppo_epochs
    )
    return micro, planned_optimizer_steps(micro, schedule.gradient_accumulation_steps)


def warmup_warning(warmup_steps: int, planned_steps: int, max_steps: int = 0) -> str | None:
    """Why the learning rate would never reach its peak (warmup as long as the run), or None."""
    runs = min(planned_steps, max_steps) if max_steps else planned_steps
    if not warmup_steps or warmup_steps < runs or not runs:
        return None
    return (
        f"--num_warmup_steps {warmup_steps} >= the {runs} optimizer steps this run takes: the learning rate never "
        f"leaves warmup (it reaches {100 * runs / warmup_steps:.0f}% of its peak at the last step); "
        "lower --num_warmup_steps"
    )
