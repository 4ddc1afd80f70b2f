"""The supervised training loop shared by steps 1 and 2: forward, backward, step, report, checkpoint.

Losses stay on the device between reports; the host reads them only every `log_interval` steps,
so graph-compiling devices never wait inside the loop. Non-finite losses and DeepSpeed overflow
skips are counted at each report, and training stops past `--max_bad_steps`.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from accel import Accelerator
from dschat_hal.configs import uses_critic
from dschat_hal.errors import UserError
from dschat_hal.monitor import RunClock, current_lr, format_eta, throughput
from dschat_hal.runtime import ScalarWriter, all_reduce_mean, engine_from_config, is_rank0, print_rank0, world_size

if TYPE_CHECKING:
    from dschat_hal.configs import (
        CheckpointConfig,
        DPOStepConfig,
        LoggingConfig,
        ScheduleConfig,
        Step1Config,
        Step2Config,
    )

    SupervisedConfig = Step1Config | Step2Config | DPOStepConfig

LossFn = Callable[[object, dict[str, torch.Tensor]], torch.Tensor]


class TrainingHealthError(UserError):
    """Training produced garbage (NaN/inf losses, repeated overflow) and was stopped."""


def supervised_loaders(config: SupervisedConfig, phase: int, tokenizer, backend: Accelerator):
    """Step 1 or 2's (train_set, eval_set, train_loader, eval_loader) from the step's config."""
    from dschat_hal.data import Collator, DataSpec, cache_dir_for, load_or_build
    from dschat_hal.runtime import dataloader

    data, model, seed = config.data, config.model, config.hardware.seed
    spec = DataSpec(
        data.data_path,
        data.data_split,
        phase,
        seed,
        model.max_seq_len,
        sft_only_data_path=data.sft_only_data_path if phase == 1 else [],
        # DeepSpeed-Chat ends step 2's sequences with its end-of-conversation token (step 1's with EOS)
        end_token=data.eot_token if phase == 2 and data.add_eot_token else "",
        prompt_format=data.prompt_format,
        column_keys=data.column_keys(),
    )
    cache_dir = cache_dir_for(data, config.checkpoint.output_dir)
    train_set, eval_set, dropped = load_or_build(spec, tokenizer, cache_dir, data.preprocessing_num_workers)
    if phase == 1 and any(dropped.values()):
        print_rank0(
            f"warning: dropped {' and '.join(f'{n} {split}' for split, n in dropped.items() if n)} rows whose "
            "prompt + chosen text is empty (one token, nothing to learn)"
        )
    if phase == 2 and any(dropped.values()):
        sizes = {"train": len(train_set), "eval": len(eval_set)}
        counts = " and ".join(f"{n} of {n + sizes[split]} {split}" for split, n in dropped.items() if n)
        print_rank0(
            f"warning: {counts} pairs have identical chosen and rejected tokens after truncation to "
            f"--max_seq_len {model.max_seq_len}; dropped them (raise --max_seq_len to keep them)"
        )
    collate = Collator(phase, tokenizer.pad_token_id, backend, model.max_seq_len)
    train_loader = dataloader(train_set, collate, model.per_device_train_batch_size, seed)
    eval_loader = dataloader(eval_set, collate, model.per_device_eval_batch_size, seed, shuffle=False)
    return train_set, eval_set, train_loader, eval_loader


def partitioned_load(backend: Accelerator, config: SupervisedConfig, dtype: torch.dtype, stage: int) -> dict | None:
    """The DeepSpeed config `from_pretrained` needs to partition the step's model at ZeRO `stage` while
    loading it (None below ZeRO-3)."""
    from dschat_hal.runtime import partitioned_load_config

    return partitioned_load_config(
        backend,
        dtype=dtype,
        stage=stage,
        offload=config.hardware.offload,
        micro_batch=config.model.per_device_train_batch_size,
        grad_accum=config.schedule.gradient_accumulation_steps,
    )


def total_optimizer_steps(loader, schedule: ScheduleConfig) -> int:
    """Optimizer steps in the planned epochs: the length of the learning-rate schedule."""
    return schedule.num_train_epochs * math.ceil(len(loader) / schedule.gradient_accumulation_steps)


def supervised_engine(
    backend: Accelerator,
    model: torch.nn.Module,
    config: Step1Config | Step2Config | DPOStepConfig,
    train_loader,
    dtype: torch.dtype,
    job_name: str,
):
    """The DeepSpeed engine of the model steps 1, 2 and DPO train, its schedule over `train_loader`'s epochs."""
    return engine_from_config(
        backend,
        model,
        config.optim,
        config.schedule,
        config.hardware,
        config.logging,
        dtype=dtype,
        total_steps=total_optimizer_steps(train_loader, config.schedule),
        micro_batch=config.model.per_device_train_batch_size,
        job_name=job_name,
    )


def progress(iterable, total: int, description: str, logging_config: LoggingConfig):
    """A tqdm bar on rank 0 when stderr is a terminal and --quiet is off; the iterable otherwise."""
    if logging_config.quiet or not is_rank0() or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, leave=False)


# ---- checkpoints ------------------------------------------------------------------------------
def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def resume_position(position: dict, batches_per_epoch: int) -> dict:
    """Where a resumed run starts: a position saved after an epoch's last batch is the next epoch's
    start (there the uninterrupted run set the next epoch and created its data iterators)."""
    if position["batch"] >= batches_per_epoch:
        return {**position, "epoch": position["epoch"] + 1, "batch": 0}
    return position


def restore_rng(position: dict) -> None:
    """Restore the RNG state saved with `position`, once (it is popped). Call it where the
    uninterrupted run's RNG stood at the save: before an epoch's data iterators are created when
    resuming at an epoch start (creating one draws a seed from the global RNG), after them mid-epoch."""
    if "rng" in position:
        set_rng_state(position.pop("rng"))


def save_trained_lm(engine, tokenizer, config: SupervisedConfig, tag: str, flags: Mapping[str, Any]) -> None:
    """Publish the trained causal LM at the config's output directory in one rename (rank 0 writes;
    collective under ZeRO-3): the weights, PEFT adapters with `--only_optimize_lora`, and the run's
    record (`args.json`: the resolved `flags`, `made_by.json`)."""
    from dschat_hal.models import atomic_directory, write_lm
    from dschat_hal.models.checkpoint import adapter_base
    from dschat_hal.provenance import write_record
    from dschat_hal.runtime import is_rank0

    with atomic_directory(config.checkpoint.output_dir, enabled=is_rank0()) as tmp:
        lora_only = config.schedule.only_optimize_lora
        base = adapter_base(config.optim.lora_dim, lora_only, config.model.model_name_or_path)
        write_lm(engine.module, tokenizer, tmp, adapter_base=base)
        write_record(tmp, flags, tag)


def checkpoint_dir(checkpoint: CheckpointConfig) -> str | None:
    """`--checkpoint_dir`, else a sibling of the output (the final save replaces the output directory)."""
    output_dir = checkpoint.output_dir
    return checkpoint.checkpoint_dir or (f"{output_dir.rstrip('/')}_checkpoints" if output_dir else None)


def save_checkpoint(engines: dict, checkpoint: CheckpointConfig, setup: dict, position: dict, step: int) -> None:
    """One resumable checkpoint of all `engines` (model, optimizer, scheduler) plus RNG and data
    position, published as one unit (see `dschat_hal.checkpoints`); `setup` is the run's
    `resume_setup`. Collective: every rank calls it."""
    from dschat_hal.checkpoints import save_unit

    save_unit(checkpoint_dir(checkpoint), step, engines, {"position": position, "rng": rng_state()}, setup)
    if checkpoint.save_total_limit:
        from dschat_hal.checkpoints import prune

        if is_rank0():
            prune(checkpoint_dir(checkpoint), checkpoint.save_total_limit)


def load_checkpoint(engines: dict, checkpoint: CheckpointConfig, setup: dict) -> dict | None:
    """With `--resume`, resume every engine from the latest checkpoint unit, which must agree with
    `setup` (the run's `resume_setup`); returns the saved data position and RNG state (None: fresh
    start). The caller restores the RNG at the first resumed batch, after the data loader's iterator
    has drawn its own seed, as it did in the uninterrupted run."""
    from dschat_hal.checkpoints import load_unit

    root = checkpoint_dir(checkpoint)
    if not checkpoint.resume:
        return None
    client = load_unit(root, engines, setup)
    if client is None:
        print_rank0(f"--resume: no checkpoint under {root}; starting from scratch")
        return None
    print_rank0(f"resumed from {os.path.join(root, client.get('unit', ''))} at {client['position']}")
    return {**client["position"], "rng": client["rng"]}


def claim_outputs(checkpoint: CheckpointConfig) -> None:
    """At start (rank 0): lock the output and checkpoint directories for this run, and remove the
    leftovers of interrupted saves (temporary directories, incomplete checkpoints)."""
    from dschat_hal.checkpoints import clean_root
    from dschat_hal.faults import lock_output, lock_path, remove_stale_temporaries

    if int(os.environ.get("RANK", "0")) != 0:
        return
    root = checkpoint_dir(checkpoint)
    output_dir = checkpoint.output_dir
    lock_output(output_dir)
    if root and (checkpoint.save_interval or checkpoint.resume):
        if checkpoint.checkpoint_dir and lock_path(root) != (lock_path(output_dir) if output_dir else None):
            lock_output(root)
        clean_root(root)
        if checkpoint.resume and os.path.isdir(root):
            from dschat_hal.checkpoints import choose_unit

            choose_unit(Path(root))  # no unit verifies: said now, before models load (load_unit says which it uses)
    if output_dir:
        out = os.path.abspath(os.path.expanduser(output_dir))
        remove_stale_temporaries(os.path.dirname(out), os.path.basename(out))


RESUME_KEYS = (
    "model_name_or_path",
    "actor_model_name_or_path",
    "critic_model_name_or_path",
    "per_device_train_batch_size",
    "per_device_generation_batch_size",
    "per_device_training_batch_size",
    "generation_batches",
    "gradient_accumulation_steps",
    "zero_stage",
    "actor_zero_stage",
    "critic_zero_stage",
    "lora_dim",
    "actor_lora_dim",
    "critic_lora_dim",
    "enable_ema",
    "offload",
)


def resume_setup(config: object, dtype: torch.dtype | str) -> dict:
    """What a checkpoint must agree with to resume exactly: models, batch sizes, ZeRO stages, LoRA,
    world size and the run's `dtype` (resolved). `config`: a step's config; the keys are its flags'
    names (`RESUME_KEYS`), as checkpoints have always stored them."""
    from dschat_hal.configs import to_flags
    from dschat_hal.runtime import world_size

    flags = to_flags(config)
    setup = {}
    for key in RESUME_KEYS:
        if key in flags:
            value = flags[key]
            if key.endswith("model_name_or_path") and os.path.exists(os.path.expanduser(value)):
                value = os.path.realpath(os.path.expanduser(value))
            setup[key] = value
    setup["world_size"] = world_size()
    setup["dtype"] = str(dtype)
    if not uses_critic(flags.get("advantage_estimator", "gae")):  # absent from PPO's units, as before
        setup["advantage_estimator"] = flags["advantage_estimator"]
        setup["n_samples_per_prompt"] = flags["n_samples_per_prompt"]
        for unused in ("critic_zero_stage", "critic_lora_dim"):  # no critic: its flags change nothing
            setup.pop(unused, None)
    return setup


# ---- health ----------------------------------------------------------------------------------
def dtype_advice(engine) -> str:
    """The dtype change worth suggesting for a run that produced non-finite numbers ('' in fp32)."""
    if engine is not None and getattr(engine, "fp16_enabled", lambda: False)():
        return "use --dtype bf16 or fp32"
    if engine is not None and getattr(engine, "bfloat16_enabled", lambda: False)():
        return "try --dtype fp32"
    return ""


class HealthGuard:
    """Counts bad steps (non-finite numbers or optimizer overflow skips); raises past `max_bad_steps`."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps, self.bad_steps, self.skipped_seen = max_bad_steps, 0, 0

    def check(self, values, first_step: int, engine=None, what: str = "loss") -> None:
        """`values`: this interval's numbers, one per step from `first_step` on (a row of numbers per
        step when 2-D: a step is bad once, however many of its numbers are non-finite)."""
        finite = torch.isfinite(torch.as_tensor(values, dtype=torch.float32))  # runs at report time only
        bad = (~finite.all(dim=-1) if finite.dim() > 1 else ~finite).nonzero().flatten().tolist()
        skipped = getattr(engine, "skipped_steps", 0) if engine is not None else 0
        new_skips, self.skipped_seen = skipped - self.skipped_seen, skipped
        if bad:
            print_rank0(f"warning: non-finite {what} at step {first_step + bad[0]} ({len(bad)} in this interval)")
        if new_skips:
            print_rank0(f"warning: {new_skips} optimizer steps skipped for gradient overflow")
        # a step whose loss is non-finite is also the step the optimizer skips (fp16): count it once
        self.bad_steps += max(len(bad), new_skips)
        if self.bad_steps > self.max_bad_steps:
            advice = ", ".join(a for a in ("lower the learning rate", dtype_advice(engine)) if a)
            raise TrainingHealthError(
                f"training stopped: {self.bad_steps} bad steps (non-finite {what} or overflow), more than "
                f"--max_bad_steps {self.max_bad_steps}; {advice}, or raise --max_bad_steps"
            )


# ---- the loop --------------------------------------------------------------------------------
def train(
    engine,
    loader,
    loss_fn: LossFn,
    backend: Accelerator,
    config: SupervisedConfig,
    writer: ScalarWriter,
    tag: str,
    on_step: Callable[[int], None] | None = None,
    rows_per_sample: int = 1,
    *,
    dtype: torch.dtype,
) -> list[float]:
    """Run the epochs (or stop after `--max_steps`) in the run's resolved `dtype` (which checkpoints
    record); returns the reported mean losses.
    `on_step(global_step)` runs after every optimizer step (e.g. a periodic evaluation).
    Each report also gives samples/s and tokens/s (all ranks; a sample is `rows_per_sample` batch
    rows: step 2's chosen and rejected), the learning rate and the run's ETA."""
    schedule, logging_config, checkpoint = config.schedule, config.logging, config.checkpoint
    setup = resume_setup(config, dtype)
    planned = total_optimizer_steps(loader, schedule)
    limit = min(planned, schedule.max_steps) if schedule.max_steps else planned
    saved = load_checkpoint({tag: engine}, checkpoint, setup) or {"epoch": 0, "batch": 0}
    guard = HealthGuard(schedule.max_bad_steps)
    reported: list[float] = []
    pending: list[torch.Tensor] = []
    start = time.time()
    clock = RunClock(engine.global_steps, limit)
    counted = [0.0, 0.0]  # samples, tokens since the last report (counted on the host batches: no sync)
    engine.train()
    if engine.global_steps >= limit:  # resumed from the last step's checkpoint: left as the run ended
        loader.sampler.set_epoch(saved["epoch"])
        restore_rng(saved)
        return reported
    position = resume_position(saved, len(loader))
    for epoch in range(position["epoch"], schedule.num_train_epochs):
        loader.sampler.set_epoch(epoch)
        skip = position["batch"] if epoch == position["epoch"] else 0
        if not skip:  # an epoch start: before the iterator below draws its seed
            restore_rng(position)
        for index, batch in enumerate(progress(loader, len(loader), f"{tag} epoch {epoch + 1}", logging_config)):
            if index < skip:
                continue
            restore_rng(position)  # mid-epoch: after the iterator drew its seed, as in the uninterrupted run
            counted[0] += len(batch["input_ids"]) / rows_per_sample
            counted[1] += int(batch["attention_mask"].sum())
            loss = loss_fn(engine, backend.to_device(batch))
            engine.backward(loss)
            backend.mark_step()
            steps_before = engine.global_steps
            engine.step()
            backend.mark_step()
            pending.append(loss.detach())
            if on_step is not None and engine.global_steps != steps_before:
                on_step(engine.global_steps)
            done = engine.global_steps >= limit
            if len(pending) >= logging_config.log_interval or done or logging_config.print_loss:
                losses = torch.stack(pending).float()
                guard.check(losses, engine.global_steps - len(pending) + 1, engine)
                mean = all_reduce_mean(losses.mean()).item()
                samples, tokens = (all_reduce_mean(losses.new_tensor(counted)) * world_size()).tolist()
                counted = [0.0, 0.0]
                pending.clear()
                reported.append(mean)
                seconds, eta = clock.tick(engine.global_steps)
                rates = throughput(samples, tokens, seconds)
                lr = current_lr(engine)
                writer.add(
                    {f"{tag}/loss": mean, f"{tag}/lr": lr, f"{tag}/eta_s": eta}
                    | {f"{tag}/{key}": value for key, value in rates.items()},
                    engine.global_steps,
                )
                print_rank0(
                    f"[{tag}] epoch {epoch + 1} step {engine.global_steps}/{limit} loss {mean:.4f} lr {lr:.2e} "
                    f"| {rates['samples_per_s']:.1f} samples/s, {rates['tokens_per_s']:.0f} tokens/s "
                    f"| ETA {format_eta(eta) if eta == eta else '?'} ({time.time() - start:.1f}s)"
                )
            # only between optimizer steps: a checkpoint inside an accumulation window would lose the
            # window's gradients (DeepSpeed counts micro-steps from 0 again after a resume)
            at_boundary = engine.micro_steps % schedule.gradient_accumulation_steps == 0
            interval = checkpoint.save_interval
            if interval and at_boundary and engine.global_steps % interval == 0:
                at = {"epoch": epoch, "batch": index + 1}
                save_checkpoint({tag: engine}, checkpoint, setup, at, engine.global_steps)
            if done:
                return reported
    return reported


@torch.no_grad()
def evaluate(
    engine, loader, metric_fn: Callable, backend: Accelerator, max_batches: int | None = None
) -> dict[str, float]:
    """Sum `metric_fn(engine, batch)` (a dict of tensors) over the loader (its first `max_batches`
    batches when given), averaged over ranks."""
    engine.eval()
    totals: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        for key, value in metric_fn(engine, backend.to_device(batch)).items():
            totals[key] = totals.get(key, 0) + value.detach().float()
        backend.mark_step()
    engine.train()
    return {key: all_reduce_mean(value).item() for key, value in totals.items()}
