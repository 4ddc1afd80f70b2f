"""Step 3: RLHF fine-tuning of the step-1 actor with PPO against the step-2 reward model."""

from __future__ import annotations

import itertools
import math
import time

import torch

from dschat_hal.args import step3_parser, validate
from dschat_hal.data import Collator, DataSpec, load_or_build
from dschat_hal.data.unsupervised import block_dataset, collate_blocks, read_texts
from dschat_hal.errors import cli_entry
from dschat_hal.models import load_tokenizer, require_reward_checkpoint, save_lm
from dschat_hal.rlhf.engine import RLHFEngine
from dschat_hal.rlhf.trainer import PPOConfig, PPOTrainer
from dschat_hal.runtime import ScalarWriter, all_reduce_mean, dataloader, is_rank0, print_rank0, setup, write_summary


def split_batch(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Cut a batch of experience into training micro-batches."""
    n = next(iter(batch.values())).size(0)
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


@cli_entry
def main(argv: list[str]) -> dict:
    args = validate(step3_parser().parse_args(argv))
    backend = setup(args)
    require_reward_checkpoint(args.critic_model_name_or_path)
    tokenizer = load_tokenizer(args.actor_model_name_or_path)
    spec = DataSpec(args.data_path, args.data_split, 3, args.seed, max_prompt_seq_len=args.max_prompt_seq_len)
    prompts, _, dropped = load_or_build(spec, tokenizer, args.data_output_path)
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
        blocks = block_dataset(
            read_texts(args.unsupervised_dataset_name, args.unsupervised_dataset_config_name),
            tokenizer,
            args.max_prompt_seq_len + args.max_answer_seq_len,
        )
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
    writer = ScalarWriter(args.tensorboard_path if args.enable_tensorboard else None, "step3")
    print_rank0(f"step 3 on {backend.describe()}: {len(prompts)} prompts, {total_iters} PPO updates planned")

    history: list[dict[str, float]] = []
    reward_ema, step, started = None, 0, time.time()
    experiences, unsup_batches = [], []
    for epoch in range(args.num_train_epochs):
        loader.sampler.set_epoch(epoch)
        unsup_iter = iter(unsup_loader) if unsup_loader else itertools.repeat(None)
        for batch, unsup in zip(loader, unsup_iter, strict=False):
            batch = backend.to_device(batch)
            experiences.append(trainer.generate_experience(batch["prompt"], batch["prompt_att_mask"]))
            unsup_batches.append(backend.to_device(unsup))
            if len(experiences) < args.generation_batches:
                continue
            stats = []
            for _ in range(args.ppo_epochs):
                for exp, unsup_batch in zip(experiences, unsup_batches, strict=True):
                    for part in split_batch(exp, args.per_device_training_batch_size):
                        stats.append(trainer.train_rlhf(part))
                    if unsup_batch is not None:
                        stats[-1]["unsup_loss"] = trainer.train_unsupervised(unsup_batch, args.unsup_coef)
                engine.update_ema()
            step += 1
            reward = torch.cat([e["rewards"] for e in experiences]).mean()
            lengths = torch.cat([e["answer_length"] for e in experiences]).float()
            record = {key: all_reduce_mean(torch.stack([s[key] for s in stats]).mean()).item() for key in stats[0]}
            record.update(
                reward=all_reduce_mean(reward).item(),
                answer_length=all_reduce_mean(lengths.mean()).item(),
                short_answers=all_reduce_mean((lengths <= 1).float().mean()).item(),
                kl_ctl=trainer.kl_ctl,
            )
            reward_ema = record["reward"] if reward_ema is None else 0.9 * reward_ema + 0.1 * record["reward"]
            record["reward_ema"] = reward_ema
            trainer.update_kl_controller(record["kl"], len(stats))
            history.append(record)
            writer.add({f"step3/{k}": v for k, v in record.items()}, step)
            print_rank0(
                f"[step3] epoch {epoch + 1} step {step} reward {record['reward']:.3f} (ema {reward_ema:.3f}) "
                f"actor loss {record['actor_loss']:.4f} critic loss {record['critic_loss']:.4f} "
                f"kl {record['kl']:.4f} answer len {record['answer_length']:.1f} ({time.time() - started:.1f}s)"
            )
            if args.print_answers and is_rank0() and step % args.print_answers_interval == 0:
                seq = experiences[0]["seq"]
                print(
                    f"  prompt: {tokenizer.decode(seq[0, : experiences[0]['prompts'].size(1)], skip_special_tokens=True)}"
                )
                print(
                    f"  answer: {tokenizer.decode(seq[0, experiences[0]['prompts'].size(1) :], skip_special_tokens=True)}"
                )
            experiences, unsup_batches = [], []
            if args.enable_test_mode and args.test_stop_step and step >= args.test_stop_step:
                break
        if args.enable_test_mode and args.test_stop_step and step >= args.test_stop_step:
            break
    writer.close()
    timings = trainer.timings
    total_time = sum(timings.values()) or 1.0
    print_rank0("step 3 time: " + ", ".join(f"{k} {v:.1f}s ({100 * v / total_time:.0f}%)" for k, v in timings.items()))
    if args.output_dir:
        save_lm(engine.actor.module, tokenizer, f"{args.output_dir}/actor", is_writer=is_rank0())
        engine.critic.module.save(f"{args.output_dir}/critic", tokenizer, is_writer=is_rank0())
        if engine.actor_ema is not None:
            save_lm(engine.actor_ema.module, tokenizer, f"{args.output_dir}/actor_ema", is_writer=is_rank0())
        print_rank0(f"saved actor and critic under {args.output_dir}")
    summary = {"history": history, "timings": timings, "output_dir": args.output_dir}
    write_summary(args.output_dir, summary)
    return summary


if __name__ == "__main__":
    main()
