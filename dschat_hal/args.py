"""The command line of the three steps, built from their typed configs (`dschat_hal/configs.py`: each
field's default and help), and the one place that maps flags to configs (`to_config`) and back
(`to_flags`); the checks of flag values before any work (`validate`).

Nothing heavy is imported at module level (no torch, transformers or DeepSpeed): entry points
answer `--help` from here before they import the rest (`answer_help`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

from dschat_hal.configs import (  # noqa: F401  (PROMPT_FORMATS, ATTN_*, NUM_PADDING_HELP: also imported from here)
    ATTN_HELP,
    ATTN_IMPLEMENTATIONS,
    KL_LOSS_DEFAULTS,
    NUM_PADDING_HELP,
    PROMPT_FORMATS,
    DPOStepConfig,
    LoggingConfig,
    Step1Config,
    Step2Config,
    Step3Config,
    to_config,
    to_flags,
)


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


# ---- flags <-> configs: each config field is the flag `--{prefix}{name}` -------------------------------
def _parts(cls: type) -> list[tuple[dataclasses.Field, type]]:
    return [(f, f.metadata["config"]) for f in dataclasses.fields(cls) if "config" in f.metadata]


def _part_defaults(part_field: dataclasses.Field) -> object | None:
    """The step's instance of a part (its defaults), or None for a part the user must give."""
    if part_field.default_factory is dataclasses.MISSING:
        return None
    return part_field.default_factory()


def _add_part(parser: argparse.ArgumentParser, part_field: dataclasses.Field, cls: type) -> None:
    """One concern's flags, as one `--help` group."""
    meta = part_field.metadata
    group = parser.add_argument_group(meta["title"])
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    defaults = _part_defaults(part_field)
    for f in dataclasses.fields(cls):
        flag = dict(f.metadata)
        text = flag.pop("help")
        for name, value in meta["help_vars"].items():
            text = text.replace(f"{{{name}}}", value) if text else text
        kwargs: dict = {"help": text, **{k: v for k, v in flag.items() if k != "exclusive"}}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        elif flag.get("action") != "store_true":
            kwargs["default"] = getattr(defaults, f.name) if defaults is not None else f.default
        where = group
        if "exclusive" in flag:
            if flag["exclusive"] not in exclusive:
                exclusive[flag["exclusive"]] = group.add_mutually_exclusive_group()
            where = exclusive[flag["exclusive"]]
        where.add_argument(f"--{meta['prefix']}{f.name}", **kwargs)


def parser_for(config_class: type) -> argparse.ArgumentParser:
    """The command line of a step config (`configs.Step1Config`, ...): one group of flags per part, each
    flag with the field's default and help."""
    p = argparse.ArgumentParser(description=config_class.DESCRIPTION, formatter_class=DefaultsHelpFormatter)
    for part_field, cls in _parts(config_class):
        _add_part(p, part_field, cls)
    p.set_defaults(output_name=config_class.OUTPUT_NAME)
    return p


def step1_parser() -> argparse.ArgumentParser:
    return parser_for(Step1Config)


def step2_parser() -> argparse.ArgumentParser:
    return parser_for(Step2Config)


def dpo_parser() -> argparse.ArgumentParser:
    """Step 2's alternative, DPO (upstream's step2_dpo_finetuning): the step-1 actor trained on the preference
    pairs against a frozen copy of itself; upstream's flag names and defaults."""
    return parser_for(DPOStepConfig)


def step3_parser() -> argparse.ArgumentParser:
    return parser_for(Step3Config)


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
        from dschat_hal.decisions import FROZEN, placement_by_flags

        for name, (trained, stage_flag, offload_flag) in FROZEN.items():
            if stage_flag in present:  # ZeRO-0 with offload: one line naming both flags
                placement_by_flags(name, trained, 0, present[stage_flag], present.get(offload_flag, False))
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


# ---- the hybrid engine's tensor parallelism (checked after --dry_run, which may plan any group size) --------
def check_tp_size(tp_size: int, world_size: int, node_limit: int, hybrid_engine: bool) -> None:
    """Refuse an `--inference_tp_size` that cannot form groups (one line naming the fix)."""
    from dschat_hal.errors import UserError

    if tp_size == 1:
        return
    if not hybrid_engine:
        raise UserError(
            f"--inference_tp_size {tp_size} shards the hybrid engine's generation: add --enable_hybrid_engine"
        )
    if world_size % tp_size:
        raise UserError(
            f"--inference_tp_size {tp_size} must divide the number of ranks ({world_size}): "
            f"use a divisor of {world_size}, or launch a multiple of {tp_size} processes"
        )
    if tp_size > node_limit:
        raise UserError(
            f"--inference_tp_size {tp_size} is more than the {node_limit} device(s) of one node: a tensor-parallel "
            f"group must live on one node; use at most {node_limit}"
        )


def check_tp_args(args) -> None:
    """`check_tp_size` for a step's arguments, before anything is loaded or written: the ranks from the
    launcher's environment, the node's limit from the backend."""
    if args.inference_tp_size == 1:
        return
    import os

    import accel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_tp_size(
        args.inference_tp_size, world, accel.get(args.device).tensor_parallel_limit(), args.enable_hybrid_engine
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

    logging_config = resolve_report_to(to_config(args, LoggingConfig))
    args.report_to, args.enable_tensorboard = logging_config.report_to, logging_config.enable_tensorboard
    return args
