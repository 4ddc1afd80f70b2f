"""One argument builder shared by the three steps: flag families added per step.

Nothing heavy is imported at module level (no torch, transformers or DeepSpeed): entry points
answer `--help` from here before they import the rest (`answer_help`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from accel import DEVICE_CHOICES

PROMPT_FORMATS = ("plain", "chat_template")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
ATTN_HELP = "attention kernels of every model loaded (transformers' attn_implementation; default: its own choice)"


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` shows every option's default (flags that take no value have none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.default is argparse.SUPPRESS or "%(default)" in text or "(default: " in text:
            return text
        return f"{text} (default: %(default)s)".strip()


def answer_help(make_parser: Callable[[], argparse.ArgumentParser], argv: list[str] | None = None) -> None:
    """Print the help and exit 0 when `argv` (default: the command line) asks for it; else return.

    An entry point calls this before its heavy imports, so `--help` takes a blink instead of seconds.
    The entry point's own parser parses the whole `argv`, as its `main` would first: the text, and any
    usage error, are the ones `main` gives."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg == "-h" or (len(arg) > 2 and "--help".startswith(arg)) for arg in argv):
        make_parser().parse_args(argv)


def column_keys(args: argparse.Namespace) -> dict[str, str]:
    """--prompt_key/--chosen_key/--rejected_key as role -> column (only those given)."""
    return {
        role: getattr(args, f"{role}_key")
        for role in ("prompt", "chosen", "rejected")
        if getattr(args, f"{role}_key", None)
    }


def _parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=DefaultsHelpFormatter)


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
    for role, example in (("prompt", "question"), ("chosen", "response"), ("rejected", "bad_response")):
        g.add_argument(
            f"--{role}_key",
            default=None,
            metavar="COLUMN",
            help=f"the data column holding the {role} text or messages (e.g. {example}; default: {role}, "
            "else TRL's completion/messages/text for chosen)",
        )
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
    g.add_argument(
        "--add_eot_token",
        action="store_true",
        help="register --eot_token as an additional special token (one id, never split; embeddings grow to fit)",
    )
    g.add_argument("--eot_token", default="<|endoftext|>", help="the end-of-text token --add_eot_token registers")
    g.add_argument(
        "--prompt_format",
        choices=("plain", "chat_template"),
        default="plain",
        help="plain: the data's 'Human: ... Assistant:' text; chat_template: the turns rendered with the "
        "tokenizer's chat template (as TRL does), answers ending in its end-of-turn token",
    )


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="hardware backend")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="training dtype")
    g.add_argument("--attn_implementation", default=None, choices=ATTN_IMPLEMENTATIONS, help=ATTN_HELP)
    g.add_argument("--seed", type=int, default=1234, help="seeds the data split, shuffling and model init")
    g.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher")
    g.add_argument(
        "--output_dir",
        default=None,
        help="where the trained model is saved, HF format; '' saves nothing (default: output/actor, output/reward "
        "or output/rlhf under the current directory, for steps 1, 2 and 3)",
    )
    g.add_argument("--offload", action="store_true", help="ZeRO-Offload optimizer (and ZeRO-3 params) to the CPU")
    g.add_argument("--no_fused_kernels", action="store_true", help="torch AdamW instead of fused device kernels")
    g.add_argument(
        "--optimizer",
        default="auto",
        choices=["auto", "deepspeed_fused"],
        help="auto: the device's fused AdamW (CPU and CUDA: torch's AdamW(fused=True), HPU: Habana's FusedAdamW); "
        "deepspeed_fused: DeepSpeed's FusedAdam (CUDA; its op builds with nvcc on first use). "
        "--offload and --no_fused_kernels choose theirs",
    )
    g.add_argument(
        "--zero_hpz_enabled",
        action="store_true",
        help="ZeRO++ hpZ: ZeRO-3 weights also partitioned within each node (multi-node ZeRO-3 only)",
    )
    g.add_argument(
        "--compute_fp32_loss",
        type=_bool,
        default=None,
        nargs="?",
        const=True,
        help="compute losses in fp32 (default: the device's policy, e.g. bloom on HPU)",
    )
    g.add_argument("--bucket_lengths", type=int, nargs="*", default=None, help="pad sequence lengths to these buckets")
    g.add_argument("--enable_tensorboard", action="store_true", help="upstream's flag: --report_to tensorboard")
    g.add_argument(
        "--report_to",
        choices=["tensorboard", "wandb", "none"],
        default=None,
        help="where scalars go (default: tensorboard with --enable_tensorboard, else none); "
        "wandb: imported only then, offline with WANDB_MODE=offline",
    )
    g.add_argument("--tensorboard_path", default="step_tensorboard", help="where TensorBoard logs go")
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
    g.add_argument("--save_total_limit", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    g.add_argument("--max_bad_steps", type=int, default=0, help="non-finite/overflow steps tolerated before stopping")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--audit_shapes", action="store_true", help="record the distinct input shapes each model sees")
    hpu_graphs = g.add_mutually_exclusive_group()
    hpu_graphs.add_argument(
        "--enable_hpu_graphs",
        action="store_true",
        help="HPU: step-3 generation in HPU graphs (HabanaAI's fork's flag; the default on HPU in lazy mode)",
    )
    hpu_graphs.add_argument(
        "--disable_hpu_graphs",
        action="store_true",
        help="HPU: step-3 generation without HPU graphs (they are on by default in lazy mode)",
    )
    g.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    g.add_argument("--verbose", action="store_true", help="keep DeepSpeed's own info log and memory reports")
    add_plan_args(p)


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """The memory plan (dschat_hal/memory_plan/): checked before any weights are loaded."""
    g = p.add_argument_group("memory plan")
    g.add_argument("--dry_run", action="store_true", help="print the memory plan per rank and phase, then stop")
    g.add_argument("--num_devices", type=int, default=None, help="ranks the plan assumes (default: WORLD_SIZE)")
    g.add_argument(
        "--device_memory", default=None, help="memory per device for the plan, e.g. 40GiB (default: what is free)"
    )
    g.add_argument(
        "--skip_memory_check", action="store_true", help="start even when the memory plan says it does not fit"
    )


def add_optim_args(p: argparse.ArgumentParser, prefixes: tuple[str, ...] = ("",)) -> None:
    """Optimiser flags per trained model (`--learning_rate`, or `--actor_...` and `--critic_...`) and
    the shared schedule. Learning rates are set per step by the step's parser."""
    for prefix in prefixes:
        g = p.add_argument_group(f"{prefix or 'model '}optimisation")
        g.add_argument(f"--{prefix}learning_rate", type=float, help="peak learning rate (after warmup)")
        g.add_argument(f"--{prefix}weight_decay", type=float, default=0.0, help="AdamW weight decay")
        g.add_argument(f"--{prefix}zero_stage", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage")
        g.add_argument(f"--{prefix}gradient_checkpointing", action="store_true")
        unset = "0: off, as TRL does in PPO" if prefix else "its config's"
        g.add_argument(
            f"--{prefix}dropout", type=float, default=None, help=f"override the model's dropout (None: {unset})"
        )
        g.add_argument(f"--{prefix}lora_dim", type=int, default=0, help="LoRA rank (0: off)")
        g.add_argument(
            f"--{prefix}lora_module_name",
            default="layers.",
            help="substring of the linear layers to adapt ('layers.' covers OPT's decoder.layers. and llama's)",
        )
        g.add_argument(f"--{prefix}lora_learning_rate", type=float, default=5e-4, help="learning rate of LoRA factors")
    g = p.add_argument_group("schedule")
    g.add_argument(
        "--only_optimize_lora",
        action="store_true",
        help="train only the LoRA factors (step 2 also trains its new value head)",
    )
    g.add_argument("--num_train_epochs", type=int, default=1, help="epochs over the step's data")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument(
        "--lr_scheduler_type",
        default="cosine",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="learning-rate schedule over the planned optimizer steps",
    )
    g.add_argument("--num_warmup_steps", type=int, default=0, help="optimizer steps of linear warmup")


NUM_PADDING_HELP = (
    "accepted for upstream compatibility, without effect: end scores and the pairwise loss find each "
    "sequence's tokens through the attention mask, so OPT's leading padding token needs no offset"
)


def add_eval_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_interval", type=int, default=0, help=f"evaluate {what} every N steps (0: off)")
    g.add_argument("--eval_iters", type=int, default=100, help="at most this many evaluation batches per evaluation")


def _supervised_parser(description: str) -> argparse.ArgumentParser:
    p = _parser(description)
    p.add_argument(
        "--model_name_or_path", default="tiny-opt", help="hub name, local dir, or tiny-opt|tiny-bloom|tiny-llama"
    )
    p.add_argument("--per_device_train_batch_size", type=int, default=16, help="training micro-batch per device")
    p.add_argument("--per_device_eval_batch_size", type=int, default=16, help="evaluation batch per device")
    p.add_argument("--max_seq_len", type=int, default=512, help="prompt + answer tokens (longer rows are cut)")
    add_data_args(p)
    add_optim_args(p)
    add_runtime_args(p)
    return p


def step1_parser() -> argparse.ArgumentParser:
    p = _supervised_parser("Step 1: supervised fine-tuning of the actor")
    p.set_defaults(learning_rate=1e-3, tensorboard_path="step1_tensorboard", output_name="actor")
    return p


def step2_parser() -> argparse.ArgumentParser:
    p = _supervised_parser("Step 2: reward model fine-tuning on preference pairs")
    p.add_argument("--num_padding_at_beginning", type=int, default=1, help=NUM_PADDING_HELP)
    add_eval_args(p, "reward accuracy and scores on the eval pairs")
    p.add_argument(
        "--center_reward",
        action="store_true",
        help="after training, store the mean score of (at most --eval_iters batches of) the training pairs with "
        "the model, for step 3's --center_reward",
    )
    p.set_defaults(learning_rate=5e-5, tensorboard_path="step2_tensorboard", output_name="reward")
    return p


def dpo_parser() -> argparse.ArgumentParser:
    """Step 2's alternative, DPO (upstream's step2_dpo_finetuning): the step-1 actor trained on the preference
    pairs against a frozen copy of itself; upstream's flag names and defaults."""
    p = _supervised_parser("Step 2 alternative: DPO fine-tuning of the actor on preference pairs (no reward model)")
    p.add_argument(
        "--beta",
        type=float,
        default=0.1,
        help="DPO temperature (typically 0.1 to 0.5): how far the policy may move from the reference",
    )
    p.add_argument(
        "--label_smoothing",
        type=float,
        default=0.0,
        help="conservative DPO: the share of preference labels assumed flipped, in [0, 0.5)",
    )
    p.add_argument("--offload_reference_model", action="store_true", help="ZeRO-Offload the reference model")
    p.add_argument(
        "--reference_zero_stage",
        default="auto",
        choices=["auto", "0", "3"],
        help="the frozen reference: 0 replicated, 3 partitioned; auto: 3 when the model is ZeRO-3 or with "
        "--offload_reference_model, else 0 (upstream's rule)",
    )
    add_eval_args(p, "DPO loss, rewards and accuracy on the eval pairs")
    p.set_defaults(learning_rate=1e-3, tensorboard_path="step2_tensorboard", output_name="dpo")
    return p


def step3_parser() -> argparse.ArgumentParser:
    p = _parser("Step 3: RLHF fine-tuning with PPO or a critic-free estimator (GRPO, RLOO, REINFORCE++, ReMax)")
    p.add_argument("--actor_model_name_or_path", required=True, help="step-1 output (or any causal LM)")
    p.add_argument(
        "--critic_model_name_or_path",
        required=True,
        help="step-2 output: the reward model, and the critic's initial weights (gae only)",
    )
    p.add_argument("--num_padding_at_beginning", type=int, default=1, help=NUM_PADDING_HELP)
    p.add_argument("--per_device_generation_batch_size", type=int, default=16, help="prompts per device per generation")
    p.add_argument("--per_device_training_batch_size", type=int, default=16, help="experience rows per PPO micro-batch")
    p.add_argument("--generation_batches", type=int, default=1, help="generation batches collected per PPO step")
    p.add_argument("--ppo_epochs", type=int, default=1, help="passes over each step's experience")
    p.add_argument("--max_prompt_seq_len", type=int, default=256, help="prompt tokens (left-padded to this)")
    p.add_argument("--max_answer_seq_len", type=int, default=256, help="generated tokens at most")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of generation")
    p.add_argument(
        "--max_seconds",
        type=float,
        default=0.0,
        help="stop at the first PPO step boundary after this many seconds of training (0: no limit; counted from "
        "the loop's start, model loading excluded; a wall-time budget); the lr schedule still spans the epochs",
    )
    p.add_argument(
        "--enable_hybrid_engine",
        action="store_true",
        help="generate in the actor's generation form: ZeRO-3 weights gathered once per phase into a hook-free "
        "copy, LoRA folded in, our decode loop over a static KV cache",
    )
    p.add_argument(
        "--hybrid_engine", default="own", choices=["own", "deepspeed"], help="'deepspeed' is refused (see README)"
    )
    p.add_argument(
        "--release_inference_cache", action="store_true", help="hybrid engine: free the KV cache after each phase"
    )
    p.add_argument(
        "--unpin_actor_parameters",
        action="store_true",
        help="hybrid engine, ZeRO-3: free the gathered inference copy after each phase (less memory, slower)",
    )
    p.add_argument(
        "--inference_tp_size",
        type=int,
        default=1,
        help="hybrid engine: generate on groups of this many ranks, the actor sharded by DeepSpeed AutoTP",
    )
    p.add_argument(
        "--tp_gather_partition_size",
        type=int,
        default=8,
        help="hybrid engine, ZeRO-3: layers gathered per group when the whole model does not fit at once",
    )
    p.add_argument(
        "--greedy_generation",
        action="store_true",
        help="decode greedily (upstream DeepSpeed-Chat's choice); default: sample with --temperature",
    )
    p.add_argument(
        "--enable_device_graphs",
        action="store_true",
        help="capture the hybrid engine's decode step in device graphs (CUDA graphs, HPU graphs; on the CPU "
        "torch.compile's eager backend, a check of the capture); prompts then pad to --max_prompt_seq_len "
        "(or --bucket_lengths)",
    )
    p.add_argument("--offload_reference_model", action="store_true", help="ZeRO-Offload the reference model")
    p.add_argument("--offload_reward_model", action="store_true", help="ZeRO-Offload the reward model")
    for name, trained in (("reference", "actor"), ("reward", "critic")):
        p.add_argument(
            f"--{name}_zero_stage",
            default="auto",
            choices=["auto", "0", "3"],
            help=f"the frozen {name} model: 0 replicated (no gathers in its forward), 3 partitioned; auto: 3 with "
            f"--offload_{name}_model, 0 unless the {trained} is ZeRO-3 and the memory plan needs it partitioned",
        )
    p.add_argument(
        "--enable_mixed_precision_lora",
        action="store_true",
        help="ZeRO++ quantised frozen weights for the actor (needs --actor_lora_dim > 0 and --actor_zero_stage 3)",
    )
    p.add_argument(
        "--align_overflow",
        action="store_true",
        help="fp16: when actor or critic overflows, skip both optimizer steps (keeps them in step)",
    )
    p.add_argument("--enable_ema", action="store_true", help="keep an EMA copy of the actor (beta 0.992)")
    p.add_argument("--unsupervised_dataset_name", default=None, help="text dataset for the ptx loss")
    p.add_argument("--unsupervised_dataset_config_name", default=None, help="its configuration name")
    p.add_argument(
        "--unsup_coef",
        type=float,
        default=27.8,
        help="weight of the ptx loss, accumulated with each PPO micro-batch into one actor step",
    )
    p.add_argument(
        "--per_device_unsup_batch_size",
        type=int,
        default=None,
        help="ptx rows per generation batch, split across its PPO micro-batches (None: the generation batch size "
        "x --n_samples_per_prompt)",
    )
    p.add_argument("--kl_ctl", type=float, default=0.1, help="KL penalty coefficient")
    p.add_argument("--target_kl", type=float, default=None, help="adapt kl_ctl towards this KL (off by default)")
    p.add_argument("--clip_reward_value", type=float, default=5.0, help="reward-model scores are clipped to ±this")
    p.add_argument(
        "--center_reward",
        action="store_true",
        help="subtract the mean training score step 2 stored with the reward model (step 2 --center_reward)",
    )
    p.add_argument(
        "--normalize_reward",
        action="store_true",
        help="standardise reward-model scores by their running mean/std before the clip (OpenRLHF's)",
    )
    p.add_argument(
        "--whiten_advantages", action="store_true", help="whiten advantages per PPO micro-batch (TRL's default)"
    )
    p.add_argument(
        "--recompute_old_logprobs",
        action="store_true",
        help="always compute the actor's old log-probs and the critic's old values in separate experience "
        "forwards, as upstream does (by default, with one PPO epoch over one micro-batch per generation batch and "
        "the model's dropout off, they are taken from the training forwards, which see the same weights: one "
        "actor and one critic forward less per step; the critic's graph is then kept through the actor's update)",
    )
    p.add_argument("--cliprange", type=float, default=0.2, help="PPO ratio clip")
    p.add_argument("--cliprange_value", type=float, default=0.2, help="critic value clip")
    p.add_argument("--gamma", type=float, default=1.0, help="discount")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    p.add_argument(
        "--advantage_estimator",
        choices=["gae", "grpo", "rloo", "reinforce_pp", "remax"],
        default="gae",
        help="gae: PPO with the critic; critic-free (no critic is built, --critic_model_name_or_path is the "
        "reward model only): grpo (group mean/std), rloo (leave-one-out mean), reinforce_pp (REINFORCE++: "
        "discounted returns, batch-whitened), remax (minus the greedy answer's reward)",
    )
    p.add_argument(
        "--n_samples_per_prompt",
        type=int,
        default=1,
        help="answers sampled per prompt (the experience batch is prompts x N rows); grpo and rloo need N >= 2",
    )
    p.add_argument(
        "--dr_grpo",
        action="store_true",
        help="grpo as Dr. GRPO: no division by the group's std, and the policy loss summed over answer tokens "
        "divided by rows x --max_answer_seq_len",
    )
    p.add_argument(
        "--kl_loss",
        action="store_true",
        help="the KL to the reference model as a loss term (GRPO's placement, verl's use_kl_loss): "
        "--kl_loss_coef x the mean of --kl_estimator over answer tokens, and no KL penalty in the reward",
    )
    p.add_argument(
        "--kl_estimator",
        choices=["k1", "k2", "k3"],
        default=None,
        help="with --kl_loss, Schulman's estimator of KL(policy || reference) per token, r = p_ref / p: "
        "k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r (default: k3, GRPO's and verl's low_var_kl)",
    )
    p.add_argument(
        "--kl_loss_coef",
        type=float,
        default=None,
        help="with --kl_loss, the KL term's weight (default: 0.001, verl's kl_loss_coef)",
    )
    p.add_argument(
        "--log_rollout_mismatch",
        action="store_true",
        help="keep the generation engine's log-prob of each sampled token (fp32) and log per step the share "
        "of answer tokens whose training/rollout probability ratio lies outside [0.9, 1.1] (rollout_mismatch)",
    )
    p.add_argument(
        "--rollout_is_cap",
        type=float,
        default=None,
        help="truncated importance sampling: weight each answer token's policy loss by min(p_train / p_rollout, "
        "C), detached (verl's TIS; 2 is usual); implies --log_rollout_mismatch (off by default)",
    )
    p.add_argument("--print_answers", action="store_true", help="print a prompt and its answer")
    p.add_argument("--print_answers_interval", type=int, default=1, help="PPO steps between printed answers")
    p.add_argument(
        "--allow_random_critic",
        action="store_true",
        help="accept a built-in tiny (random) critic/reward model instead of a step-2 output",
    )
    p.add_argument("--enable_test_mode", action="store_true", help="stop after --test_stop_step PPO steps")
    p.add_argument("--test_stop_step", type=int, default=0, help="the PPO step --enable_test_mode stops at")
    add_data_args(p)
    add_optim_args(p, prefixes=("actor_", "critic_"))
    add_eval_args(p, "the mean reward of answers to held-out prompts")
    add_runtime_args(p)
    p.set_defaults(
        actor_learning_rate=9.65e-6,
        critic_learning_rate=5e-6,
        num_warmup_steps=100,
        tensorboard_path="step3_tensorboard",
        output_name="rlhf",
    )
    return p


POSITIVE_INTS = (
    "preprocessing_num_workers",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "per_device_generation_batch_size",
    "per_device_training_batch_size",
    "per_device_unsup_batch_size",
    "gradient_accumulation_steps",
    "max_seq_len",
    "max_prompt_seq_len",
    "max_answer_seq_len",
    "num_train_epochs",
    "ppo_epochs",
    "generation_batches",
    "log_interval",
    "print_answers_interval",
    "eval_iters",
    "tp_gather_partition_size",
    "inference_tp_size",
    "n_samples_per_prompt",
)
NON_NEGATIVE_INTS = (
    "eval_interval",
    "max_steps",
    "save_interval",
    "save_total_limit",
    "max_bad_steps",
    "num_warmup_steps",
    "test_stop_step",
    "lora_dim",
    "actor_lora_dim",
    "critic_lora_dim",
)
LEARNING_RATES = (
    "learning_rate",
    "actor_learning_rate",
    "critic_learning_rate",
    "lora_learning_rate",
    "actor_lora_learning_rate",
    "critic_lora_learning_rate",
)
DROPOUTS = ("dropout", "actor_dropout", "critic_dropout")
ZERO_STAGES = ("zero_stage", "actor_zero_stage", "critic_zero_stage")


def _flag(name: str) -> str:
    return f"--{name}"


def validate_numbers(args: argparse.Namespace) -> None:
    """Counts, sizes, rates and probabilities in their ranges; one line naming the flag and the fix."""
    import math
    import os
    import sys

    from dschat_hal.errors import UserError

    present = vars(args)
    for name in POSITIVE_INTS:
        if name in present and present[name] is not None and present[name] < 1:
            raise UserError(f"{_flag(name)} must be at least 1 (got {present[name]})")
    for name in NON_NEGATIVE_INTS:
        if name in present and present[name] is not None and present[name] < 0:
            off = " (0 turns it off)" if name not in ("num_warmup_steps", "test_stop_step") else ""
            raise UserError(f"{_flag(name)} must be 0 or more{off} (got {present[name]})")
    for name in LEARNING_RATES:
        if name not in present:
            continue
        value = present[name]
        if not math.isfinite(value) or value < 0 or value > 3.4e38:
            raise UserError(f"{_flag(name)} must be a finite number >= 0 that fits a float32 (got {value})")
        if value == 0 and "lora" not in name and os.environ.get("RANK", "0") == "0":  # once, not per rank
            print(f"warning: {_flag(name)} is 0: the weights will not change", file=sys.stderr)
    for name in DROPOUTS:
        value = present.get(name)
        if value is not None and not 0.0 <= value < 1.0:
            raise UserError(f"{_flag(name)} must be in [0, 1) (got {value})")
    if "data_split" in present:
        from dschat_hal.data.pipeline import split_fractions

        split_fractions(args.data_split)
    for length in present.get("bucket_lengths") or ():
        if length < 1:
            raise UserError(f"--bucket_lengths holds {length}: every bucket must be a length of at least 1 token")
    if "temperature" in present and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UserError(
            f"--temperature must be > 0 (got {args.temperature}); for greedy decoding use step 3's greedy "
            "generation option instead of temperature 0"
        )
    if "max_seconds" in present and not (math.isfinite(args.max_seconds) and args.max_seconds >= 0):
        raise UserError(f"--max_seconds must be a finite number of seconds >= 0 (0: no limit; got {args.max_seconds})")
    if "beta" in present and not (math.isfinite(args.beta) and args.beta > 0):
        raise UserError(f"--beta must be a finite number > 0 (got {args.beta}); upstream's default is 0.1")
    if "label_smoothing" in present and not 0.0 <= args.label_smoothing < 0.5:
        raise UserError(f"--label_smoothing must be in [0, 0.5) (got {args.label_smoothing}); 0 is plain DPO")
    if "reference_zero_stage" in present:
        from dschat_hal.rlhf.placement import FROZEN, fixed_placement

        for name in FROZEN:
            fixed_placement(args, name)  # ZeRO-0 with offload: one line naming both flags
    if getattr(args, "offload", False):
        for name in ZERO_STAGES:
            if present.get(name) == 0:
                raise UserError(f"--offload needs ZeRO: set {_flag(name)} to 1, 2 or 3 (or drop --offload)")
    if present.get("device_memory") is not None:  # before anything is claimed or written
        from dschat_hal.memory_plan import parse_bytes

        parse_bytes(args.device_memory)


# Where a step saves when --output_dir is not given (upstream saves nothing then, silently): the demo's
# layout (training/e2e_rlhf.py), under the current directory; the step's start-up lines say so.
DEFAULT_OUTPUT_ROOT = "output"


def default_output(args: argparse.Namespace) -> None:
    """Give a step run without --output_dir its default output directory (`output/actor`,
    `output/reward`, `output/rlhf`), and keep the start-up line that says where the model goes
    (`args.output_note`; also for `--output_dir ''`, which saves nothing)."""
    import os

    name = getattr(args, "output_name", None)
    if args.output_dir is None and name:
        args.output_dir = os.path.join(DEFAULT_OUTPUT_ROOT, name)
        args.output_note = (
            f"saving the trained model to {args.output_dir} at the end (no --output_dir given; "
            "pass --output_dir DIR to choose, or '' to save nothing)"
        )
    elif args.output_dir == "":
        args.output_note = "--output_dir '': the trained model will not be saved"


def validate_paths(args: argparse.Namespace) -> None:
    """Output, checkpoint and cache locations usable before any work is done (not after training)."""
    import os

    from dschat_hal.errors import UserError
    from dschat_hal.faults import require_writable_dir

    checkpoints = args.checkpoint_dir or (f"{args.output_dir.rstrip('/')}_checkpoints" if args.output_dir else None)
    if args.output_dir:
        require_writable_dir(args.output_dir, "--output_dir")
        out = os.path.realpath(os.path.expanduser(args.output_dir))
        if os.path.commonpath([out, os.getcwd()]) == out:
            raise UserError(
                f"--output_dir {args.output_dir} contains the current directory, and the final save replaces "
                "the whole output directory; choose a new subdirectory such as ./output"
            )
        if args.checkpoint_dir and os.path.commonpath([out, os.path.realpath(args.checkpoint_dir)]) == out:
            raise UserError(
                f"--checkpoint_dir {args.checkpoint_dir} is inside --output_dir, which the final save replaces; "
                "put it beside the output (the default is OUTPUT_DIR_checkpoints)"
            )
    if checkpoints and (args.save_interval or args.resume):
        require_writable_dir(checkpoints, "--checkpoint_dir" if args.checkpoint_dir else "the checkpoint directory")
    if getattr(args, "data_output_path", None):
        require_writable_dir(args.data_output_path, "--data_output_path")


def validate_estimator(args: argparse.Namespace) -> None:
    """Step 3: the advantage estimator's needs (grpo and rloo compare several answers per prompt)."""
    from dschat_hal.errors import UserError
    from dschat_hal.rlhf.advantages import GROUP_ESTIMATORS

    estimator, n = args.advantage_estimator, args.n_samples_per_prompt
    if estimator in GROUP_ESTIMATORS and n < 2:
        raise UserError(
            f"--advantage_estimator {estimator} compares the answers to the same prompt: add "
            f"--n_samples_per_prompt N with N >= 2 (got {n})"
        )
    if args.dr_grpo and estimator != "grpo":
        raise UserError(f"--dr_grpo modifies grpo: add --advantage_estimator grpo (got {estimator}), or drop --dr_grpo")
    validate_kl_and_rollout(args)


KL_LOSS_DEFAULTS = {"kl_estimator": "k3", "kl_loss_coef": 0.001}


def validate_kl_and_rollout(args: argparse.Namespace) -> None:
    """Step 3: --kl_loss and its options, --rollout_is_cap (issue #29); fills the KL loss defaults."""
    import math

    from dschat_hal.errors import UserError

    for name, default in KL_LOSS_DEFAULTS.items():
        if getattr(args, name) is not None and not args.kl_loss:
            raise UserError(f"{_flag(name)} sets the KL loss term: add --kl_loss, or drop {_flag(name)}")
        if getattr(args, name) is None:
            setattr(args, name, default)
    coef = args.kl_loss_coef
    if not (math.isfinite(coef) and coef >= 0):
        raise UserError(f"--kl_loss_coef must be a finite number >= 0 (got {coef})")
    if args.kl_loss and args.target_kl is not None:
        raise UserError("--target_kl adapts the KL penalty in the reward, which --kl_loss removes: drop one of them")
    cap = args.rollout_is_cap
    if cap is not None and not (math.isfinite(cap) and cap >= 1):
        raise UserError(
            f"--rollout_is_cap must be a finite number >= 1 (got {cap}): a cap below 1 would scale down "
            "tokens both engines agree on; 2 is usual"
        )


def validate(args: argparse.Namespace) -> argparse.Namespace:
    """Reject out-of-range and contradictory flags and unusable paths, with one line each."""
    from dschat_hal.errors import UserError

    default_output(args)
    validate_numbers(args)
    lora_dims = [getattr(args, k) for k in ("lora_dim", "actor_lora_dim", "critic_lora_dim") if hasattr(args, k)]
    if args.only_optimize_lora and not any(lora_dims):
        raise UserError("--only_optimize_lora needs LoRA: add --lora_dim (or --actor_lora_dim/--critic_lora_dim) > 0")
    if args.resume and not (args.checkpoint_dir or args.output_dir):
        raise UserError("--resume needs to know where checkpoints are: pass --output_dir or --checkpoint_dir")
    if args.save_interval and not (args.checkpoint_dir or args.output_dir):
        raise UserError("--save_interval needs --output_dir or --checkpoint_dir")
    if hasattr(args, "advantage_estimator"):
        validate_estimator(args)
    validate_paths(args)
    from dschat_hal.monitor import resolve_report_to

    resolve_report_to(args)
    return args
