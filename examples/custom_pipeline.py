"""Step 3's RLHF API from Python, without the command line: your own PPO loop.

As DeepSpeed-Chat's README shows with `DeepSpeedRLHFEngine(...)`, `DeepSpeedPPOTrainer(...)`,
`generate_experience` and `train_rlhf`: build step 3's typed config (`dschat_hal.configs`, each field
a `training/step3_rlhf_finetuning/main.py` flag with its default and help), then the four models
(`RLHFEngine`) and the trainer (`PPOTrainer`) from it, and loop over prompt batches.

Runs on the CPU in seconds with the built-in tiny (random) models and the bundled prompts:

    python examples/custom_pipeline.py --steps 2

For a real run, name step 1's and step 2's outputs in `RLHFModelConfig`.
"""

from __future__ import annotations

import accel  # isort: skip  (first: the OpenMP defaults precede torch)

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import dschat_hal  # noqa: F401,E402  (first of the library: its environment defaults precede torch)
from dschat_hal.configs import (  # noqa: E402
    EngineConfig,
    HardwareConfig,
    OptimConfig,
    PPOConfig,
    RLHFModelConfig,
    Step3Config,
    Step3ScheduleConfig,
)


def tiny_config(device: str = "cpu") -> Step3Config:
    """Step 3 on the tiny random models: short prompts and answers, batches of two, a learning rate
    that moves tiny models (upstream's defaults are for billion-parameter ones)."""
    return Step3Config(
        models=RLHFModelConfig("tiny-opt", "tiny-opt", allow_random_critic=True),
        engine=EngineConfig(per_device_generation_batch_size=2, max_prompt_seq_len=48, max_answer_seq_len=12),
        ppo=PPOConfig(per_device_training_batch_size=2),
        actor=OptimConfig(learning_rate=5e-4, dropout=0.0),
        critic=OptimConfig(learning_rate=5e-4, dropout=0.0),
        schedule=Step3ScheduleConfig(num_warmup_steps=0),
        hardware=HardwareConfig(device=device, dtype="fp32"),
    )


def build(config: Step3Config, total_steps: int, cache_dir: str | None = None):
    """The trainer of `config` (its engine, `trainer.rlhf`, holds the four models) and a loader of
    prompt batches. `total_steps`: the optimizer steps the learning-rate schedule spans."""
    from dschat_hal.data import Collator, DataSpec, load_or_build
    from dschat_hal.models import load_tokenizer
    from dschat_hal.rlhf.engine import RLHFEngine
    from dschat_hal.rlhf.trainer import PPOSettings, PPOTrainer
    from dschat_hal.runtime import dataloader, start_backend

    backend = start_backend(config.hardware, device_graphs=config.engine.enable_device_graphs)
    tokenizer = load_tokenizer(config.models.actor_model_name_or_path)
    data, engine_config = config.data, config.engine
    spec = DataSpec(
        data.data_path,
        data.data_split,
        3,
        config.hardware.seed,
        max_prompt_seq_len=engine_config.max_prompt_seq_len,
        prompt_format=data.prompt_format,
        column_keys=data.column_keys(),
    )
    prompts, _, _ = load_or_build(spec, tokenizer, cache_dir)
    collate = Collator(3, tokenizer.pad_token_id, backend, engine_config.max_prompt_seq_len)
    loader = dataloader(prompts, collate, engine_config.per_device_generation_batch_size, config.hardware.seed)
    engine = RLHFEngine(backend, config, tokenizer, num_total_iters=total_steps)  # actor, reference, critic, reward
    return PPOTrainer(engine, backend, tokenizer, PPOSettings.from_config(config, decisions=engine.decisions)), loader


def train(trainer, loader, steps: int) -> list[dict[str, float]]:
    """`steps` PPO steps: generate experience on a prompt batch, train on it. Returns each step's
    statistics (the reward-model score, losses, KL)."""
    history = []
    for step, batch in zip(range(1, steps + 1), loader, strict=False):
        batch = trainer.backend.to_device(batch)
        experience = trainer.generate_experience(batch["prompt"], batch["prompt_att_mask"])
        stats = trainer.train_rlhf(experience)
        record = {"reward": experience["raw_rewards"].mean().item(), **{k: v.item() for k, v in stats.items()}}
        history.append(record)
        print(
            f"step {step}: reward {record['reward']:.4f} actor loss {record['actor_loss']:.4f} "
            f"critic loss {record['critic_loss']:.4f} kl {record['kl']:.4f}",
            flush=True,
        )
    return history


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="PPO steps")
    parser.add_argument("--device", default="cpu", choices=accel.DEVICE_CHOICES, help="hardware backend")
    parser.add_argument("--cache_dir", default=None, help="Arrow cache of the tokenised prompts (default: none)")
    options = parser.parse_args(argv)
    trainer, loader = build(tiny_config(options.device), options.steps, options.cache_dir)
    history = train(trainer, loader, options.steps)
    if not all(math.isfinite(value) for record in history for value in record.values()):
        raise SystemExit("error: a statistic is not finite")
    return history


if __name__ == "__main__":
    main()
