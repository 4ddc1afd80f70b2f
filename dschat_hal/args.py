"""One argument builder shared by the three steps: flag families added per step."""

from __future__ import annotations

import argparse

from accel import DEVICE_CHOICES


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data_path",
        nargs="*",
        default=["local/jsonfile"],
        help="dataset names (e.g. Dahoas/rm-static), local/jsonfile, or local dirs/files",
    )
    g.add_argument("--data_split", default="2,4,4", help="shares of each dataset for steps 1,2,3 (disjoint slices)")
    g.add_argument("--sft_only_data_path", nargs="*", default=[], help="datasets used only in step 1")
    g.add_argument(
        "--data_output_path",
        default=None,
        help="Arrow cache of tokenised data (default: data_cache beside --output_dir, else "
        "~/.cache/dschat_hal/data; '' to disable)",
    )
    g.add_argument(
        "--preprocessing_num_workers",
        type=int,
        default=None,
        help="processes that tokenise the data (datasets.map num_proc; default: one)",
    )


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="hardware backend")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="training dtype")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher")
    g.add_argument("--output_dir", default=None, help="where the trained model is saved (HF format)")
    g.add_argument("--offload", action="store_true", help="ZeRO-Offload optimizer (and ZeRO-3 params) to the CPU")
    g.add_argument("--no_fused_kernels", action="store_true", help="torch AdamW instead of fused device kernels")
    g.add_argument(
        "--compute_fp32_loss",
        type=_bool,
        default=None,
        nargs="?",
        const=True,
        help="compute losses in fp32 (default: the device's policy, e.g. bloom on HPU)",
    )
    g.add_argument("--bucket_lengths", type=int, nargs="*", default=None, help="pad sequence lengths to these buckets")
    g.add_argument("--enable_tensorboard", action="store_true")
    g.add_argument("--tensorboard_path", default="step_tensorboard")
    g.add_argument("--print_loss", action="store_true", help="print the loss of every step")
    g.add_argument("--log_interval", type=int, default=10, help="steps between progress lines (host syncs)")
    g.add_argument(
        "--max_steps",
        type=int,
        default=0,
        help="stop after this many optimizer steps (0: no limit); the lr schedule still spans the epochs",
    )
    g.add_argument("--save_interval", type=int, default=0, help="save a resumable checkpoint every N steps (0: off)")
    g.add_argument("--checkpoint_dir", default=None, help="where checkpoints go (default: OUTPUT_DIR_checkpoints)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    g.add_argument("--max_bad_steps", type=int, default=0, help="non-finite/overflow steps tolerated before stopping")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--audit_shapes", action="store_true", help="record the distinct input shapes each model sees")
    g.add_argument("--enable_hpu_graphs", action="store_true", help="HPU: capture generation in HPU graphs")
    g.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def add_optim_args(p: argparse.ArgumentParser, prefixes: tuple[str, ...] = ("",), lr: float = 1e-3) -> None:
    for prefix in prefixes:
        g = p.add_argument_group(f"{prefix or 'model '}optimisation")
        g.add_argument(f"--{prefix}learning_rate", type=float, default=lr)
        g.add_argument(f"--{prefix}weight_decay", type=float, default=0.0)
        g.add_argument(f"--{prefix}zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
        g.add_argument(f"--{prefix}gradient_checkpointing", action="store_true")
        g.add_argument(f"--{prefix}dropout", type=float, default=None, help="override the model's dropout")
        g.add_argument(f"--{prefix}lora_dim", type=int, default=0, help="LoRA rank (0: off)")
        g.add_argument(f"--{prefix}lora_module_name", default="layers.", help="substring of the layers to adapt")
        g.add_argument(f"--{prefix}lora_learning_rate", type=float, default=5e-4)
    g = p.add_argument_group("schedule")
    g.add_argument("--only_optimize_lora", action="store_true", help="train only the LoRA factors")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument(
        "--lr_scheduler_type",
        default="cosine",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    g.add_argument("--num_warmup_steps", type=int, default=0)


def step1_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Step 1: supervised fine-tuning of the actor")
    p.add_argument(
        "--model_name_or_path", default="tiny-opt", help="hub name, local dir, or tiny-opt|tiny-bloom|tiny-llama"
    )
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--per_device_eval_batch_size", type=int, default=8)
    p.add_argument("--max_seq_len", type=int, default=512)
    add_data_args(p)
    add_optim_args(p)
    add_runtime_args(p)
    return p


def step2_parser() -> argparse.ArgumentParser:
    p = step1_parser()
    p.description = "Step 2: reward model fine-tuning on preference pairs"
    p.add_argument(
        "--num_padding_at_beginning",
        type=int,
        default=1,
        help="accepted for upstream compatibility; scores use attention masks instead",
    )
    return p


def step3_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Step 3: RLHF fine-tuning with PPO")
    p.add_argument("--actor_model_name_or_path", required=True, help="step-1 output (or any causal LM)")
    p.add_argument("--critic_model_name_or_path", required=True, help="step-2 output (reward model)")
    p.add_argument("--num_padding_at_beginning", type=int, default=1, help="accepted for upstream compatibility")
    p.add_argument("--per_device_generation_batch_size", type=int, default=4)
    p.add_argument("--per_device_training_batch_size", type=int, default=4)
    p.add_argument("--generation_batches", type=int, default=1)
    p.add_argument("--ppo_epochs", type=int, default=1)
    p.add_argument("--max_prompt_seq_len", type=int, default=256)
    p.add_argument("--max_answer_seq_len", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of generation")
    p.add_argument("--enable_hybrid_engine", action="store_true", help="switch the actor to its generation form")
    p.add_argument("--hybrid_engine", default="own", choices=["own", "deepspeed"])
    p.add_argument("--release_inference_cache", action="store_true")
    p.add_argument("--unpin_actor_parameters", action="store_true")
    p.add_argument("--inference_tp_size", type=int, default=1)
    p.add_argument("--tp_gather_partition_size", type=int, default=8)
    p.add_argument("--offload_reference_model", action="store_true")
    p.add_argument("--enable_ema", action="store_true", help="keep an EMA copy of the actor (beta 0.992)")
    p.add_argument("--unsupervised_dataset_name", default=None, help="text dataset for the ptx loss")
    p.add_argument("--unsupervised_dataset_config_name", default=None)
    p.add_argument("--unsup_coef", type=float, default=27.8)
    p.add_argument("--per_device_unsup_batch_size", type=int, default=4)
    p.add_argument("--kl_ctl", type=float, default=0.1, help="KL penalty coefficient")
    p.add_argument("--target_kl", type=float, default=None, help="adapt kl_ctl towards this KL (off by default)")
    p.add_argument("--clip_reward_value", type=float, default=5.0)
    p.add_argument("--cliprange", type=float, default=0.2)
    p.add_argument("--cliprange_value", type=float, default=0.2)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--print_answers", action="store_true")
    p.add_argument("--print_answers_interval", type=int, default=1)
    p.add_argument("--enable_test_mode", action="store_true")
    p.add_argument("--test_stop_step", type=int, default=0)
    add_data_args(p)
    add_optim_args(p, prefixes=("actor_", "critic_"), lr=5e-4)
    add_runtime_args(p)
    # no dropout by default in PPO: it would make the ratio π/π_old noisy (upstream's scripts pass 0.0 too)
    p.set_defaults(actor_learning_rate=5e-4, critic_learning_rate=5e-4, actor_dropout=0.0, critic_dropout=0.0)
    return p


def validate(args: argparse.Namespace) -> argparse.Namespace:
    """Reject contradictory flags with one line each."""
    from dschat_hal.errors import UserError

    lora_dims = [getattr(args, k) for k in ("lora_dim", "actor_lora_dim", "critic_lora_dim") if hasattr(args, k)]
    if args.only_optimize_lora and not any(lora_dims):
        raise UserError("--only_optimize_lora needs LoRA: add --lora_dim (or --actor_lora_dim/--critic_lora_dim) > 0")
    if args.resume and not (args.checkpoint_dir or args.output_dir):
        raise UserError("--resume needs to know where checkpoints are: pass --output_dir or --checkpoint_dir")
    if args.save_interval and not (args.checkpoint_dir or args.output_dir):
        raise UserError("--save_interval needs --output_dir or --checkpoint_dir")
    return args
