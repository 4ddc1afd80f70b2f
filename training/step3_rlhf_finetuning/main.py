"""Step 3: RLHF fine-tuning of the step-1 actor with PPO against the step-2 reward model."""

from __future__ import annotations

import itertools
import math
import time

from dschat_hal.args import step3_parser, validate
from dschat_hal.data import Collator, DataSpec, cache_dir_for, load_or_build
from dschat_hal.data.unsupervised import block_dataset, collate_blocks, read_texts
from dschat_hal.errors import UserError, cli_entry
from dschat_hal.loop import HealthGuard, load_checkpoint, progress, save_checkpoint, set_rng_state
from dschat_hal.models import load_tokenizer, require_reward_checkpoint, save_lm
from dschat_hal.rlhf.engine import RLHFEngine
from dschat_hal.rlhf.trainer import PPOConfig, PPOTrainer, materialize
from dschat_hal.runtime import ScalarWriter, dataloader, is_rank0, print_rank0, setup, shape_counts, write_summary

HEALTH_KEYS = ("reward", "advantage", "actor_loss", "critic_loss", "kl")


def report(step: int, epoch: int, record: dict, started: float) -> str:
    phases = ("generation", "experience", "training")
    total = sum(record[f"{p}_s"] for p in phases) or 1.0
    timing = ", ".join(f"{p} {record[f'{p}_s']:.2f}s ({100 * record[f'{p}_s'] / total:.0f}%)" for p in phases)
    return (
        f"[step3] epoch {epoch + 1} step {step} reward {record['reward']:.3f} (ema {record['reward_ema']:.3f}) "
        f"actor loss {record['actor_loss']:.4f} critic loss {record['critic_loss']:.4f} kl {record['kl']:.4f} "
        f"answer len {record['answer_length']:.1f} (short {100 * record['short_answers']:.0f}%) | {timing} "
        f"| {time.time() - started:.1f}s"
    )


@cli_entry
def main(argv: list[str]) -> dict:
    args = validate(step3_parser().parse_args(argv))
    require_reward_checkpoint(args.critic_model_name_or_path)
    if args.hybrid_engine == "deepspeed":
        raise UserError(
            "--hybrid_engine deepspeed is not supported: DeepSpeed's Hybrid Engine crashes or silently "
            "falls back with transformers 4.55; drop the flag"
        )
    backend = setup(args)
    if args.enable_hybrid_engine:
        print_rank0(
            "note: --enable_hybrid_engine: the project's hybrid engine is not built yet; "
            "generating with plain generate() through the device's generation context"
        )
    tokenizer = load_tokenizer(args.actor_model_name_or_path)
    spec = DataSpec(args.data_path, args.data_split, 3, args.seed, max_prompt_seq_len=args.max_prompt_seq_len)
    prompts, _, dropped = load_or_build(spec, tokenizer, cache_dir_for(args), args.preprocessing_num_workers)
    if dropped:
        print_rank0(f"dropped {dropped} prompts longer than --max_prompt_seq_len {args.max_prompt_seq_len}")
    loader = dataloader(
        prompts,
        Collator(3, tokenizer.pad_token_id, backend, args.max_prompt_seq_len),
        args.per_device_generation_batch_size,
        args.seed,
    )
    unsup_loader = None
    if args.unsupervised_dataset_name:
        texts = read_texts(args.unsupervised_dataset_name, args.unsupervised_dataset_config_name)
        blocks = block_dataset(texts, tokenizer, args.max_prompt_seq_len + args.max_answer_seq_len)
        unsup_loader = dataloader(blocks, collate_blocks, args.per_device_unsup_batch_size, args.seed)

    updates_per_batch = math.ceil(args.per_device_generation_batch_size / args.per_device_training_batch_size)
    total_iters = args.num_train_epochs * len(loader) * args.ppo_epochs * updates_per_batch
    engine = RLHFEngine(backend, args, tokenizer, total_iters)
    trainer = PPOTrainer(
        engine,
        backend,
        tokenizer,
        PPOConfig(
            max_answer_seq_len=args.max_answer_seq_len,
            kl_ctl=args.kl_ctl,
            clip_reward_value=args.clip_reward_value,
            cliprange=args.cliprange,
            cliprange_value=args.cliprange_value,
            gamma=args.gamma,
            lam=args.lam,
            temperature=args.temperature,
            target_kl=args.target_kl,
        ),
    )
    engines = {"actor": engine.actor, "critic": engine.critic}
    if engine.actor_ema is not None:
        engines["actor_ema"] = engine.actor_ema
    position = load_checkpoint(engines, args) or {"epoch": 0, "batch": 0, "step": 0, "reward_ema": None}
    writer = ScalarWriter(args.tensorboard_path if args.enable_tensorboard else None, "step3")
    guard = HealthGuard(args.max_bad_steps)
    print_rank0(f"step 3 on {backend.describe()}: {len(prompts)} prompts, {total_iters} PPO updates planned")

    history: list[dict[str, float]] = []
    pending: list[dict] = []  # statistics still on the device: read back every --log_interval steps
    step, reward_ema, started = position["step"], position["reward_ema"], time.time()

    def flush() -> float | None:
        """Read pending statistics back, check their health, log them; returns the reward EMA."""
        ema = reward_ema
        for offset, stats in enumerate(pending):
            record = materialize(stats)
            number = step - len(pending) + offset + 1
            guard.check([record[k] for k in HEALTH_KEYS], number, engine.actor, what="reward/advantage/loss")
            ema = record["reward"] if ema is None else 0.9 * ema + 0.1 * record["reward"]
            record["reward_ema"] = ema
            history.append(record)
            writer.add({f"step3/{k}": v for k, v in record.items()}, number)
        if pending:
            print_rank0(report(step, epoch, history[-1], started))
        pending.clear()
        return ema

    stop_at = args.test_stop_step if args.enable_test_mode and args.test_stop_step else None
    experiences, unsup_batches = [], []
    for epoch in range(position["epoch"], args.num_train_epochs):
        loader.sampler.set_epoch(epoch)
        unsup_iter = iter(unsup_loader) if unsup_loader else itertools.repeat(None)
        skip = position["batch"] if epoch == position["epoch"] else 0
        batches = progress(zip(loader, unsup_iter, strict=False), len(loader), f"step3 epoch {epoch + 1}", args)
        for index, (batch, unsup) in enumerate(batches):
            if index < skip:
                continue
            if "rng" in position:  # after the loader drew its seed, as in an uninterrupted run
                set_rng_state(position.pop("rng"))
            batch = backend.to_device(batch)
            experiences.append(trainer.generate_experience(batch["prompt"], batch["prompt_att_mask"]))
            unsup_batches.append(backend.to_device(unsup))
            if len(experiences) < args.generation_batches:
                continue
            pending.append(
                trainer.train_on(
                    experiences, unsup_batches, args.ppo_epochs, args.per_device_training_batch_size, args.unsup_coef
                )
            )
            experiences, unsup_batches = [], []
            step += 1
            if step % args.log_interval == 0 or (stop_at and step >= stop_at):
                reward_ema = flush()
            if args.print_answers and step % args.print_answers_interval == 0:
                print_rank0(trainer.describe_sample(trainer.last_experience))
            if args.save_interval and step % args.save_interval == 0:
                reward_ema = flush()
                save_checkpoint(
                    engines, args, {"epoch": epoch, "batch": index + 1, "step": step, "reward_ema": reward_ema}
                )
            if stop_at and step >= stop_at:
                break
        if stop_at and step >= stop_at:
            break
    reward_ema = flush()
    writer.close()
    print_rank0("step 3 time: " + ", ".join(f"{k} {v:.1f}s" for k, v in trainer.timings.items()))
    if args.output_dir:
        save_lm(engine.actor.module, tokenizer, f"{args.output_dir}/actor", is_writer=is_rank0())
        engine.critic.module.save(f"{args.output_dir}/critic", tokenizer, is_writer=is_rank0())
        if engine.actor_ema is not None:
            save_lm(engine.actor_ema.module, tokenizer, f"{args.output_dir}/actor_ema", is_writer=is_rank0())
        print_rank0(f"saved actor and critic under {args.output_dir}")
    summary = {
        "shape_counts": shape_counts(backend),
        "history": history,
        "timings": trainer.timings,
        "output_dir": args.output_dir,
    }
    write_summary(args.output_dir, summary)
    return summary


if __name__ == "__main__":
    main()
