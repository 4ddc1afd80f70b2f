"""Step 3: RLHF fine-tuning of the step-1 actor with PPO (or a critic-free estimator: GRPO, RLOO,
REINFORCE++, ReMax) against the step-2 reward model."""
# ruff: noqa: E402  (`--help` is answered before the heavy imports)

from __future__ import annotations

import accel  # noqa: F401  # isort: skip  (first: sets the OpenMP wait policy before torch loads)

import itertools
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

import dschat_hal  # noqa: F401  (first: the environment defaults precede torch, see dschat_hal/__init__.py)
from dschat_hal.args import answer_help, check_tp_args, step3_parser, to_config, validate
from dschat_hal.configs import EngineConfig, Step3Config

if __name__ == "__main__":
    answer_help(step3_parser)  # before the imports below load torch, transformers and DeepSpeed (seconds)

# isort: split
import torch

from dschat_hal import memory_plan
from dschat_hal.data import Collator, DataSpec, cache_dir_for, load_or_build
from dschat_hal.data.unsupervised import block_dataset, collate_blocks, read_texts
from dschat_hal.decisions import FROZEN, RunDecisions, experience_rows
from dschat_hal.errors import UserError, cli_entry
from dschat_hal.faults import fault_point
from dschat_hal.loop import (
    HealthGuard,
    TrainingHealthError,
    claim_outputs,
    dtype_advice,
    load_checkpoint,
    progress,
    restore_rng,
    resume_position,
    resume_setup,
    save_checkpoint,
)
from dschat_hal.models import atomic_directory, check_positions, load_tokenizer, require_reward_checkpoint, write_lm
from dschat_hal.models.checkpoint import adapter_base
from dschat_hal.models.lm import add_eot_token
from dschat_hal.models.reward_model import stored_score_mean
from dschat_hal.models.tiny import is_tiny
from dschat_hal.monitor import RunClock, current_lr, format_eta
from dschat_hal.provenance import write_record
from dschat_hal.rlhf.engine import RLHFEngine
from dschat_hal.rlhf.evaluation import mean_reward
from dschat_hal.rlhf.generation import make_hybrid_engine
from dschat_hal.rlhf.reward_shaping import ClipWarning
from dschat_hal.rlhf.schedule import step3_plan, warmup_warning
from dschat_hal.rlhf.trainer import PPOSettings, PPOTrainer, generation_config, materialize
from dschat_hal.runtime import (
    ScalarWriter,
    dataloader,
    is_rank0,
    print_rank0,
    setup,
    shape_counts,
    world_size,
    write_summary,
)

HEALTH_KEYS = ("reward", "advantage", "actor_loss", "critic_loss", "kl")


def report(step: int, epoch: int, record: dict, started: float) -> str:
    phases = ("generation", "experience", "training")
    total = sum(record[f"{p}_s"] for p in phases) or 1.0
    timing = ", ".join(f"{p} {record[f'{p}_s']:.2f}s ({100 * record[f'{p}_s'] / total:.0f}%)" for p in phases)
    critic = f"critic loss {record['critic_loss']:.4f} " if "critic_loss" in record else ""
    speed = (
        f" | lr {record['actor_lr']:.2e}, {record['samples_per_s']:.2f} samples/s, "
        f"generation {record['gen_tokens_per_s']:.0f} tokens/s, ETA {format_eta(record['eta_s'])}"
        if "eta_s" in record
        else ""
    )
    return (
        f"[step3] epoch {epoch + 1} step {step} reward used {record['reward_used']:.3f} "
        f"({100 * record['clipped']:.0f}% clipped), raw {record['reward']:.3f} (ema {record['reward_ema']:.3f}) "
        f"actor loss {record['actor_loss']:.4f} {critic}kl {record['kl']:.4f} "
        f"answer len {record['answer_length']:.1f} (short {100 * record['short_answers']:.0f}%) "
        + (f"rollout mismatch {100 * record['rollout_mismatch']:.1f}% " if "rollout_mismatch" in record else "")
        + f"| {timing}{speed} "
        f"| {time.time() - started:.1f}s"
    )


def planned_ppo_steps(args, epoch_batches: int, total_iters: int) -> int:
    """PPO steps (generation batches trained on) the run will take: the epochs' steps, cut at
    --test_stop_step and, approximately (in proportion), at --max_steps optimizer steps."""
    planned = args.num_train_epochs * (epoch_batches // args.generation_batches)
    limited = planned
    if args.enable_test_mode and args.test_stop_step:
        limited = min(limited, args.test_stop_step)
    if args.max_steps and total_iters:
        limited = min(limited, math.ceil(args.max_steps * planned / total_iters))
    return limited


def speeds(record: dict[str, float], step_seconds: float, eta: float) -> dict[str, float]:
    """A PPO step's throughput over all ranks (`record` holds one rank's mean counts): samples/s over
    the step's wall time, generation tokens/s over its generation phase, and the run's ETA."""
    ranks = world_size()
    return {
        "samples_per_s": record["samples"] * ranks / max(step_seconds, 1e-9),
        "gen_tokens_per_s": record["generated_tokens"] * ranks / max(record["generation_s"], 1e-9),
        "eta_s": eta,
    }


def make_generator(engine: RLHFEngine, backend, config, settings: EngineConfig):
    """The hybrid engine for `config` (the trainer's `generation_config`) with
    `settings.enable_hybrid_engine` (--enable_hybrid_engine), else None (the trainer's plain `generate`);
    a ZeRO-3 actor gathered in the layer groups the run's decisions name."""
    if not settings.enable_hybrid_engine:
        return None
    return make_hybrid_engine(
        engine.actor,
        backend,
        config,
        inference_tp_size=settings.inference_tp_size,
        dtype=engine.dtype,
        gather_group_layers=engine.decisions.gather_group_layers,
        release_inference_cache=settings.release_inference_cache,
        unpin_actor_parameters=settings.unpin_actor_parameters,
    )


def reuse_lines(decisions: RunDecisions) -> list[str]:
    """The start-up lines saying where the old log-probs and values come from."""
    reuse_reason, values_reason = decisions.old_logprobs_from_training, decisions.old_values_from_training
    reused = [
        what
        for what, reason in (("actor's old log-probs", reuse_reason), ("critic's old values", values_reason))
        if reason
    ]
    lines = []
    if reused:
        lines.append(
            f"step 3: the {' and the '.join(reused)} come from the training forwards "
            f"({reuse_reason or values_reason}: the same weights; --recompute_old_logprobs computes them apart)"
        )
    if decisions.critic_graph_refused:
        lines.append("step 3: the critic's old values come from an experience forward: the memory plan does not fit "
                     "with the critic's graph kept through the actor's update")  # fmt: skip
    return lines


def save_models(
    engine: RLHFEngine,
    tokenizer,
    output_dir: str,
    config: Step3Config | None = None,
    flags: Mapping[str, Any] | None = None,
) -> None:
    """Actor, critic (when there is one) and EMA written in full, then published together by one
    rename: a kill never leaves a new actor beside an old critic; with them `args.json` (the resolved
    `flags` and the run's decisions) and `made_by.json` (when `flags` are given). `config`: the run's,
    for the actor's PEFT adapter (`--only_optimize_lora`). Collective under ZeRO-3."""
    with atomic_directory(output_dir, enabled=is_rank0()) as tmp:
        base = (
            None
            if config is None
            else adapter_base(
                config.actor.lora_dim, config.schedule.only_optimize_lora, config.models.actor_model_name_or_path
            )
        )
        write_lm(engine.actor.module, tokenizer, tmp / "actor" if tmp else None, adapter_base=base)
        fault_point("step3_actor_written")
        if engine.critic is not None:
            engine.critic.module.write(tmp / "critic" if tmp else None, tokenizer)
        if engine.actor_ema is not None:
            write_lm(engine.actor_ema.module, tokenizer, tmp / "actor_ema" if tmp else None)
        if flags is not None:
            write_record(tmp, {**flags, **engine.decisions.record()}, "step3")


def at_optimizer_boundary(engines: dict) -> bool:
    """Every trained engine has just taken an optimizer step (no accumulated gradients pending)."""
    return all(e.micro_steps % e.gradient_accumulation_steps() == 0 for e in engines.values() if e.optimizer)


def actor_is_finite(engine: RLHFEngine) -> bool:
    """Are all of the actor's weights finite (ZeRO-3: each rank's partition), on every rank? One host read."""
    import torch

    from dschat_hal.runtime import all_reduce_mean

    local = [getattr(p, "ds_tensor", p) if hasattr(p, "ds_id") else p for p in engine.actor.module.parameters()]
    local = [t.detach() for t in local if t.numel()]
    finite = (
        torch.isfinite(torch.stack(torch._foreach_norm(local, float("inf")))).all() if local else torch.tensor(True)
    )
    return all_reduce_mean(finite.float()).item() == 1.0


def generate_checked(trainer: PPOTrainer, batch: dict, step: int) -> dict:
    """`generate_experience`, with sampling from non-finite probabilities (an actor whose finite
    weights overflow in its forward) reported as the divergence it is, naming the step."""
    try:
        return trainer.generate_experience(batch["prompt"], batch["prompt_att_mask"])
    except RuntimeError as err:
        if "probability tensor contains" not in str(err):
            raise
        raise TrainingHealthError(
            f"training stopped after step {step}: the actor's outputs are no longer finite (its probabilities "
            "contain inf/nan), so it cannot generate; lower --actor_learning_rate, or resume from an earlier checkpoint"
        ) from None


def check_last_update(pending: list[dict], flush, engine: RLHFEngine, step: int):
    """Stop before generation when the last update diverged: non-finite losses (counted against
    --max_bad_steps) or non-finite actor weights (always fatal: the actor can no longer generate).
    One host read per step, where generation syncs anyway. Returns the reward EMA when it had to
    flush the pending statistics, else None."""
    import torch

    from dschat_hal.runtime import all_reduce_mean

    last = pending[-1]
    keys = [k for k in ("actor_loss", "critic_loss") if k in last]
    losses = all_reduce_mean(torch.stack([torch.as_tensor(last[k]).float() for k in keys]))
    ema = None if bool(torch.isfinite(losses).all()) else flush()  # the same on every rank; raises past --max_bad_steps
    if not actor_is_finite(engine):
        raise TrainingHealthError(
            f"training stopped after step {step}: the actor's weights are no longer finite, so it cannot generate; "
            f"lower --actor_learning_rate, {dtype_advice(engine.actor) + ', ' if dtype_advice(engine.actor) else ''}"
            "or resume from an earlier checkpoint"
        )
    return ema


@cli_entry
def main(argv: list[str]) -> dict:
    args = validate(step3_parser().parse_args(argv))
    config = to_config(args, Step3Config)  # what the library takes; the loop below still reads some flags
    if args.dry_run:  # before the checks of what is implemented: a plan may explore any setting
        return memory_plan.dry_run(config, 3)
    if args.hybrid_engine == "deepspeed":
        raise UserError(
            "--hybrid_engine deepspeed is not supported: DeepSpeed's Hybrid Engine crashes or silently "
            "falls back with transformers 4.55; drop the flag"
        )
    check_tp_args(args)
    require_reward_checkpoint(args.critic_model_name_or_path)
    reward_center = stored_score_mean(args.critic_model_name_or_path) if args.center_reward else None
    if args.center_reward and reward_center is None:
        raise UserError(
            f"--center_reward: {args.critic_model_name_or_path} has no stored mean training score; rerun step 2 "
            "with --center_reward, or drop the flag"
        )
    if is_tiny(args.critic_model_name_or_path) and not args.allow_random_critic:
        raise UserError(
            f"--critic_model_name_or_path {args.critic_model_name_or_path} is a random built-in model, not a trained "
            "reward model; pass step 2's --output_dir, or add --allow_random_critic for a smoke test"
        )
    check_positions(
        args.actor_model_name_or_path,
        args.max_prompt_seq_len + args.max_answer_seq_len,
        "prompt + answer length",
        args.bucket_lengths,
    )
    claim_outputs(config.checkpoint)
    backend = setup(args)  # the start-up lines, which name the flags
    dtype = backend.resolve_dtype(config.hardware.dtype)
    decisions = memory_plan.decide(config, backend)  # once, for the plan, the engines, the trainer and the log
    memory_plan.check(config, 3, backend, decisions)  # before any weights are loaded
    for name in FROZEN:
        print_rank0(decisions.placements[name].describe(name, world_size()))
    if args.align_overflow and dtype == torch.float16:
        raise UserError(
            "--align_overflow with fp16 needs DeepSpeed's external overflow check and skip_step, which "
            "DeepSpeed 0.19 no longer has; use --dtype bf16 (no loss scaling, nothing to align) or drop the flag"
        )
    if args.align_overflow:
        print_rank0("note: --align_overflow: without fp16 loss scaling no step overflows; nothing to align")
    tokenizer = load_tokenizer(args.actor_model_name_or_path)
    if args.add_eot_token:
        add_eot_token(tokenizer, args.eot_token)
    spec = DataSpec(
        args.data_path,
        args.data_split,
        3,
        args.seed,
        max_prompt_seq_len=args.max_prompt_seq_len,
        prompt_format=args.prompt_format,
        column_keys=config.data.column_keys(),
    )
    cache_dir = cache_dir_for(config.data, config.checkpoint.output_dir)
    prompts, eval_prompts, dropped = load_or_build(spec, tokenizer, cache_dir, config.data.preprocessing_num_workers)
    if dropped["train"]:
        print_rank0(
            f"dropped {dropped['train']} prompts that are empty or longer than --max_prompt_seq_len "
            f"{args.max_prompt_seq_len}"
        )
    collate = Collator(3, tokenizer.pad_token_id, backend, args.max_prompt_seq_len)
    loader = dataloader(prompts, collate, args.per_device_generation_batch_size, args.seed)
    eval_loader = dataloader(eval_prompts, collate, args.per_device_generation_batch_size, args.seed, shuffle=False)
    unsup_loader = None
    if args.unsupervised_dataset_name:
        texts = read_texts(args.unsupervised_dataset_name, args.unsupervised_dataset_config_name)
        blocks = block_dataset(texts, tokenizer, args.max_prompt_seq_len + args.max_answer_seq_len)
        unsup_rows = args.per_device_unsup_batch_size or experience_rows(config)
        micro_batches = -(-experience_rows(config) // args.per_device_training_batch_size)
        if unsup_rows < micro_batches:
            raise UserError(
                f"--per_device_unsup_batch_size {unsup_rows} cannot give each of the {micro_batches} PPO "
                f"micro-batches of a generation batch a ptx row; use at least {micro_batches}"
            )
        unsup_loader = dataloader(blocks, collate_blocks, unsup_rows, args.seed)

    micro_batches, total_iters = step3_plan(config, loader, unsup_loader)
    engine = RLHFEngine(backend, config, tokenizer, total_iters, decisions)
    ppo_config = PPOSettings.from_config(config, reward_center=reward_center, decisions=decisions)
    generator = make_generator(engine, backend, generation_config(ppo_config, tokenizer), config.engine)
    trainer = PPOTrainer(engine, backend, tokenizer, ppo_config, generator=generator)
    engines = {"actor": engine.actor} | ({"critic": engine.critic} if engine.critic is not None else {})
    if engine.actor_ema is not None:
        engines["actor_ema"] = engine.actor_ema
    unit_setup = resume_setup(config, dtype)  # what a checkpoint must agree with
    position = load_checkpoint(engines, config.checkpoint, unit_setup) or {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "reward_ema": None,
    }
    saved_epoch = position["epoch"]  # an epoch is as long as the shorter of the zipped prompt and ptx loaders
    position = resume_position(position, min(len(loader), len(unsup_loader)) if unsup_loader else len(loader))
    writer = ScalarWriter.for_run(config.logging, "step3", vars(args))
    guard = HealthGuard(args.max_bad_steps)
    print_rank0(
        f"step 3 on {backend.describe()}: {len(prompts)} prompts, {micro_batches} PPO micro-batches, "
        f"{total_iters} optimizer steps planned"
        + (f", stopping after {args.max_steps} (--max_steps)" if 0 < args.max_steps < total_iters else "")
    )
    warning = warmup_warning(args.num_warmup_steps, total_iters, args.max_steps)
    if warning and is_rank0():
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    for line in reuse_lines(decisions):
        print_rank0(line)
    if reward_center is not None:
        print_rank0(f"rewards centred: the reward model's mean training score {reward_center:.3f} is subtracted")

    history: list[dict[str, float]] = []
    evaluations: list[dict[str, float]] = []
    pending: list[dict] = []  # statistics still on the device: read back every --log_interval steps
    step, reward_ema, started = position["step"], position["reward_ema"], time.time()
    epoch_batches = min(len(loader), len(unsup_loader)) if unsup_loader else len(loader)
    clock = RunClock(step, planned_ppo_steps(args, epoch_batches, total_iters))
    clip_warning = ClipWarning(args.clip_reward_value)

    evaluating = [0.0]  # seconds spent in held-out evaluations: not training, not in --max_seconds' budget

    def evaluate() -> None:
        """Mean reward of answers to held-out prompts (--eval_interval), logged and kept."""
        began = time.time()
        evaluations.append({"step": step, "reward": mean_reward(trainer, eval_loader, args.eval_iters)})
        evaluating[0] += time.time() - began
        writer.add({"step3/eval_reward": evaluations[-1]["reward"]}, step)
        print_rank0(f"[step3] step {step}: mean reward on held-out prompts {evaluations[-1]['reward']:.3f}")

    def training_seconds() -> float:
        """Seconds of this process's training loop so far, held-out evaluations excluded."""
        return time.time() - started - evaluating[0]

    def limit_reached() -> bool:
        """--enable_test_mode's stop step, --max_steps optimizer steps taken, or --max_seconds of training spent."""
        return (
            bool(stop_at and step >= stop_at)
            or bool(args.max_steps and engine.actor.global_steps >= args.max_steps)
            or bool(args.max_seconds and step > position["step"] and training_seconds() >= args.max_seconds)
        )

    def flush() -> float | None:
        """Read pending statistics back, check their health, log them; returns the reward EMA."""
        ema = reward_ema
        seconds, eta = clock.tick(step) if pending else (0.0, 0.0)
        for offset, stats in enumerate(pending):
            record = materialize(stats)
            record.update(speeds(record, seconds / len(pending), eta))
            number = step - len(pending) + offset + 1
            guard.check(
                [[record[k] for k in HEALTH_KEYS if k in record]], number, engine.actor, what="reward/advantage/loss"
            )
            ema = record["reward"] if ema is None else 0.9 * ema + 0.1 * record["reward"]
            record["reward_ema"] = ema
            history.append(record)
            if is_rank0():
                clip_warning.check(record["clipped"], record["reward"])
            writer.add({f"step3/{k}": v for k, v in record.items()}, number)
        if pending:
            print_rank0(report(step, epoch, history[-1], started))
        pending.clear()
        return ema

    stop_at = args.test_stop_step if args.enable_test_mode and args.test_stop_step else None
    experiences, unsup_batches, save_due = [], [], False
    if args.eval_interval and step == 0:  # the held-out reward before training
        evaluate()
    epoch = saved_epoch
    # resumed from a checkpoint taken at the last step: no batch runs
    for epoch in range(0) if limit_reached() else range(position["epoch"], args.num_train_epochs):
        loader.sampler.set_epoch(epoch)
        skip = position["batch"] if epoch == position["epoch"] else 0
        if not skip:  # an epoch start: before the iterators below draw their seeds
            restore_rng(position)
        unsup_iter = iter(unsup_loader) if unsup_loader else itertools.repeat(None)
        batches = progress(
            zip(loader, unsup_iter, strict=False), len(loader), f"step3 epoch {epoch + 1}", config.logging
        )
        for index, (batch, unsup) in enumerate(batches):
            if index < skip:
                continue
            restore_rng(position)  # mid-epoch: after the loaders drew their seeds, as in an uninterrupted run
            if pending:  # before generating with the updated actor: a diverged actor would crash generate()
                flushed_ema = check_last_update(pending, flush, engine, step)
                reward_ema = reward_ema if flushed_ema is None else flushed_ema
            batch = backend.to_device(batch)
            experiences.append(generate_checked(trainer, batch, step))
            unsup_batches.append(backend.to_device(unsup))
            if len(experiences) < args.generation_batches:
                continue
            pending.append(
                trainer.train_on(
                    experiences, unsup_batches, args.ppo_epochs, args.per_device_training_batch_size, args.unsup_coef
                )
            )
            pending[-1]["actor_lr"] = current_lr(engine.actor)  # host floats: no device sync
            if engine.critic is not None:
                pending[-1]["critic_lr"] = current_lr(engine.critic)
            experiences, unsup_batches = [], []
            step += 1
            if step % args.log_interval == 0 or limit_reached():
                reward_ema = flush()
            if args.eval_interval and step % args.eval_interval == 0:
                evaluate()
            if args.print_answers and step % args.print_answers_interval == 0:
                print_rank0(trainer.describe_sample(trainer.last_experience))
            save_due = save_due or bool(args.save_interval and step % args.save_interval == 0)
            if save_due and at_optimizer_boundary(engines):  # never inside an accumulation window
                reward_ema = flush()
                at = {"epoch": epoch, "batch": index + 1, "step": step, "reward_ema": reward_ema}
                save_checkpoint(engines, config.checkpoint, unit_setup, at, step)
                save_due = False
            if limit_reached():
                break
        if limit_reached():
            break
    restore_rng(position)  # resumed at the run's end (no batch ran): the RNG as the run left it
    reward_ema = flush()
    train_seconds = training_seconds()
    if args.eval_interval and (not evaluations or evaluations[-1]["step"] != step):  # and after the last step
        evaluate()
    writer.close()
    print_rank0("step 3 time: " + ", ".join(f"{k} {v:.1f}s" for k, v in trainer.timings.items()))
    if backend.use_graphs and backend.graph_counts is not None:
        counts = backend.graph_counts
        print_rank0(f"generation {backend.graph_kind}: {counts['captures']} captured, {counts['replays']} replays")
    if args.output_dir:
        save_models(engine, tokenizer, args.output_dir, config, vars(args))
        print_rank0(f"saved actor{' and critic' if engine.critic is not None else ''} under {args.output_dir}")
    summary = {
        "shape_counts": shape_counts(backend),
        "history": history,
        "evaluations": evaluations,
        "optimizer_steps": {
            "planned": total_iters,
            "actor": engine.actor.global_steps,
            **({"critic": engine.critic.global_steps} if engine.critic is not None else {}),
        },
        "timings": trainer.timings,
        "train_seconds": train_seconds,
        "graph_counts": backend.graph_counts,
        "output_dir": args.output_dir,
    }
    write_summary(args.output_dir, summary)
    return summary


if __name__ == "__main__":
    main()
