"""Run the three RLHF steps in sequence: SFT → reward model → PPO, step 3 using steps 1 and 2's outputs.

    python training/e2e_rlhf.py                       # tiny OPT on the CPU with the bundled data
    python training/e2e_rlhf.py --actor-model facebook/opt-1.3b --reward-model facebook/opt-350m \\
        --device cuda --deployment-type single_node

Each step runs in its own process (for single_node/multi_node through DeepSpeed's launcher, run by
this interpreter: no `deepspeed` on PATH needed), except the tiny demo on one device, which runs its
steps in this process; extra flags for one step go after `--step1-args`,
`--step2-args` or `--step3-args` as one string.

With `--dpo`, step 2 is DPO (training/step2_dpo_finetuning) on step 1's actor, and there is no step 3:
the DPO output (OUTPUT/dpo) is the aligned actor.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from accel import DEVICE_CHOICES
from dschat_hal.configs import ADVANTAGE_ESTIMATORS, uses_critic
from dschat_hal.errors import UserError

ROOT = Path(__file__).resolve().parent
SCRIPTS = {
    1: ROOT / "step1_supervised_finetuning" / "main.py",
    2: ROOT / "step2_reward_model_finetuning" / "main.py",
    3: ROOT / "step3_rlhf_finetuning" / "main.py",
}
DPO_SCRIPT = ROOT / "step2_dpo_finetuning" / "main.py"

OUTPUT_NAMES = {1: "actor", 2: "reward", 3: "rlhf"}

# Small enough for 2 CPU cores in about a minute, large enough to show learning.
TINY_DEFAULTS = {
    1: "--max_seq_len 128 --per_device_train_batch_size 8 --num_train_epochs 6 --learning_rate 3e-3",
    2: "--max_seq_len 128 --per_device_train_batch_size 8 --num_train_epochs 2 --learning_rate 1e-3",
    3: "--max_prompt_seq_len 64 --max_answer_seq_len 32 --per_device_generation_batch_size 8 "
    "--per_device_training_batch_size 8 --actor_learning_rate 5e-4 --critic_learning_rate 5e-4 "
    "--num_warmup_steps 0 --actor_dropout 0.0 --critic_dropout 0.0",
}
# DPO in place of steps 2 and 3: on the tiny demo, a few epochs over the pairs; for real models the settings
# of upstream's training_scripts/llama2 for DPO (its main.py's own learning rate, 1e-3, is the parser default).
TINY_DPO_DEFAULTS = (
    "--max_seq_len 128 --per_device_train_batch_size 8 --num_train_epochs 2 --learning_rate 1e-3 --dropout 0.0"
)
MODEL_DPO_DEFAULTS = (
    "--max_seq_len 512 --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --learning_rate 9.65e-6 "
    "--weight_decay 0.1 --num_warmup_steps 0 --eval_iters 10"
)
# Step 3 evaluates before its first and after its last step (held-out prompts' mean reward, the summary's
# result); an interval longer than any run adds no evaluation in between.
STEP3_EVAL = " --eval_interval 1000000"
# DeepSpeed-Chat's single-node defaults for real models.
MODEL_DEFAULTS = {
    1: "--max_seq_len 512 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --learning_rate 9.65e-6 "
    "--weight_decay 0.1 --num_warmup_steps 0 --gradient_accumulation_steps 1",
    2: "--max_seq_len 512 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --learning_rate 5e-5 "
    "--weight_decay 0.1 --num_padding_at_beginning 1",
    3: "--max_prompt_seq_len 256 --max_answer_seq_len 256 --per_device_generation_batch_size 4 "
    "--per_device_training_batch_size 4 --actor_learning_rate 9.65e-6 --critic_learning_rate 5e-6 "
    "--actor_weight_decay 0.1 --critic_weight_decay 0.1 --num_warmup_steps 100 --eval_iters 10",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--step", type=int, nargs="+", default=None, choices=[1, 2, 3], help="default: 1 2 3 (with --dpo: 1 2)"
    )
    p.add_argument(
        "--dpo",
        action="store_true",
        help="step 2 is DPO on step 1's actor (training/step2_dpo_finetuning, output OUTPUT/dpo), with no "
        "reward model and no step 3",
    )
    p.add_argument(
        "--actor-model", default="tiny-opt", help="step 1 base model (tiny-opt|tiny-bloom|tiny-llama, dir, hub)"
    )
    p.add_argument("--reward-model", default="tiny-opt", help="step 2 base model")
    p.add_argument("--actor-zero-stage", type=int, default=2)
    p.add_argument("--reward-zero-stage", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=DEVICE_CHOICES)
    p.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "fp32", "bf16", "fp16"],
        help="default: auto, except fp32 for the tiny models on the CPU (at hidden size 64, bf16's casts cost more "
        "than its matmuls save: demo 9.9 s fp32 vs 11.6 s bf16, benchmarks/RESULTS_startup.md)",
    )
    p.add_argument("--deployment-type", default="single_device", choices=["single_device", "single_node", "multi_node"])
    p.add_argument("--num-devices", type=int, default=0, help="devices per node for the launcher (0: all)")
    p.add_argument("--hostfile", default=None, help="hostfile for multi_node")
    p.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="the launcher's rendezvous port (default: single_node picks a free one for each step; multi_node: 29500)",
    )
    p.add_argument("--data-path", nargs="+", default=["local/jsonfile"])
    p.add_argument("--output-dir", default="./output")
    p.add_argument(
        "--enable-hybrid-engine",
        action="store_true",
        help="step 3 generates through the hybrid engine (--enable_hybrid_engine)",
    )
    p.add_argument(
        "--advantage-estimator",
        default="gae",
        choices=list(ADVANTAGE_ESTIMATORS),
        help="step 3's --advantage_estimator (gae: PPO with a critic; the others train no critic)",
    )
    p.add_argument(
        "--n-samples-per-prompt",
        type=int,
        default=None,
        help="step 3's --n_samples_per_prompt (default: 4 for grpo and rloo, else 1)",
    )
    p.add_argument("--dr-grpo", action="store_true", help="step 3's --dr_grpo (with --advantage-estimator grpo)")
    p.add_argument(
        "--kl-loss",
        action="store_true",
        help="step 3's --kl_loss: the KL to the reference as a loss term instead of a penalty in the reward",
    )
    p.add_argument("--kl-estimator", choices=["k1", "k2", "k3"], default=None, help="step 3's --kl_estimator")
    p.add_argument("--kl-loss-coef", type=float, default=None, help="step 3's --kl_loss_coef")
    p.add_argument("--log-rollout-mismatch", action="store_true", help="step 3's --log_rollout_mismatch")
    p.add_argument("--rollout-is-cap", type=float, default=None, help="step 3's --rollout_is_cap")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print each step's memory plan (step 3 planned on the base models) and stop; with --device-memory",
    )
    p.add_argument("--device-memory", default=None, help="memory per device for the plans, e.g. 40GiB")
    p.add_argument("--step1-args", default="", help="extra flags for step 1, as one string")
    p.add_argument("--step2-args", default="", help="extra flags for step 2, as one string")
    p.add_argument("--step3-args", default="", help="extra flags for step 3, as one string")
    args = p.parse_args(argv)
    if args.step is None:
        args.step = [1, 2] if args.dpo else [1, 2, 3]
    return args


def script(step: int, args: argparse.Namespace) -> Path:
    """The entry point of `step` (step 2 is DPO's with --dpo)."""
    return DPO_SCRIPT if step == 2 and getattr(args, "dpo", False) else SCRIPTS[step]


def output_name(step: int, args: argparse.Namespace) -> str:
    return "dpo" if step == 2 and getattr(args, "dpo", False) else OUTPUT_NAMES[step]


def launcher(args: argparse.Namespace) -> list[str]:
    """This interpreter, or DeepSpeed's launcher run by it (no `deepspeed` on PATH needed)."""
    if args.deployment_type == "single_device":
        return [sys.executable]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if args.num_devices:
        cmd += ["--num_gpus", str(args.num_devices)]
    if args.deployment_type == "multi_node" and args.hostfile:
        cmd += ["--hostfile", args.hostfile]
    port = args.master_port or (free_port() if args.deployment_type == "single_node" else None)
    if port:
        cmd += ["--master_port", str(port)]  # two runs at once never meet at DeepSpeed's default 29500
    return cmd


def free_port() -> int:
    """A TCP port no process listens on now (the launcher binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_taken(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return True
    return False


def check_master_port(args: argparse.Namespace) -> str | None:
    """A given --master-port that is out of range or held on this machine, as an error message."""
    if args.master_port is None or args.deployment_type == "single_device":
        return None
    if not 1 <= args.master_port <= 65535:
        return f"--master-port {args.master_port} is not a TCP port (1-65535)"
    if args.deployment_type == "single_node" and port_taken(args.master_port):
        return (
            f"--master-port {args.master_port} is in use on this machine (another run?); pass a free port, or drop "
            "--master-port to have one chosen"
        )
    return None


class _StepArgsError(Exception):
    pass


def _refuse(message: str):
    raise _StepArgsError(message)


def check_step_flags(args: argparse.Namespace, out: Path) -> str | None:
    """The first step whose command line its own parser refuses (an unknown flag in --stepN-args, a
    bad value), as an error message naming the step: before any step runs."""
    from dschat_hal.args import dpo_parser, step1_parser, step2_parser, step3_parser, validate_estimator

    parsers = {1: step1_parser, 2: dpo_parser if args.dpo else step2_parser, 3: step3_parser}
    for step in sorted(args.step):
        cmd = step_command(step, args, out)
        parser = parsers[step]()
        parser.error = _refuse  # an exception instead of usage + exit
        try:
            parsed, unknown = parser.parse_known_args(cmd[cmd.index(str(script(step, args))) + 1 :])
            if step == 3:  # the estimator's and KL loss's combinations, before steps 1 and 2 run for minutes
                validate_estimator(parsed)
        except _StepArgsError as err:
            return f"step {step} refuses its flags ({err}); check --step{step}-args"
        except UserError as err:
            return f"step {step} refuses its flags: {err}"
        if unknown:
            return (
                f"step {step} does not know {' '.join(unknown)} (from --step{step}-args); "
                f"see python {script(step, args).relative_to(ROOT.parent)} --help"
            )
    return None


def tiny_run(args: argparse.Namespace) -> bool:
    """Both base models are the built-in tiny ones (the demo)."""
    return args.actor_model.startswith("tiny-") and args.reward_model.startswith("tiny-")


def estimator_flags(args: argparse.Namespace) -> list[str]:
    """Step 3's estimator flags from --advantage-estimator/--n-samples-per-prompt (none for plain PPO)."""
    estimator = getattr(args, "advantage_estimator", "gae")
    samples = getattr(args, "n_samples_per_prompt", None)
    if samples is None:
        samples = 4 if estimator in ("grpo", "rloo") else 1
    flags = ["--advantage_estimator", estimator] if estimator != "gae" else []
    flags += ["--n_samples_per_prompt", str(samples)] if samples != 1 else []
    for name in PASSED_SWITCHES:
        if getattr(args, name, False):
            flags.append(f"--{name}")
    for name in PASSED_VALUES:
        if getattr(args, name, None) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    return flags


# step 3's policy-loss flags e2e passes on, under the same names with dashes
PASSED_SWITCHES = ("dr_grpo", "kl_loss", "log_rollout_mismatch")
PASSED_VALUES = ("kl_estimator", "kl_loss_coef", "rollout_is_cap")
# flags of the defaults above that only the critic reads: left out when the estimator builds no critic
CRITIC_DEFAULTS = ("--critic_learning_rate", "--critic_dropout", "--critic_weight_decay")


def without_critic_flags(defaults: str) -> str:
    """`defaults` less the critic's flags and their values (a critic-free step 3 notes them as unused)."""
    words = shlex.split(defaults)
    kept = [
        w for i, w in enumerate(words) if w not in CRITIC_DEFAULTS and (i == 0 or words[i - 1] not in CRITIC_DEFAULTS)
    ]
    return shlex.join(kept)


def step3_flags_given(args: argparse.Namespace) -> list[str]:
    """The e2e flags that only step 3 reads, as typed, when given."""
    given = [f"--{n.replace('_', '-')}" for n in PASSED_SWITCHES if getattr(args, n, False)]
    return given + [f"--{n.replace('_', '-')}" for n in PASSED_VALUES if getattr(args, n, None) is not None]


def step_command(step: int, args: argparse.Namespace, out: Path) -> list[str]:
    tiny = tiny_run(args)
    dpo = step == 2 and getattr(args, "dpo", False)
    if dpo:
        defaults = TINY_DPO_DEFAULTS if tiny else MODEL_DPO_DEFAULTS
    else:
        defaults = (TINY_DEFAULTS if tiny else MODEL_DEFAULTS)[step] + (STEP3_EVAL if step == 3 else "")
        if step == 3 and not uses_critic(getattr(args, "advantage_estimator", "gae")):
            defaults = without_critic_flags(defaults)
    dtype = args.dtype or ("fp32" if tiny and args.device == "cpu" else "auto")
    common = [
        "--device",
        args.device,
        "--dtype",
        dtype,
        "--data_path",
        *args.data_path,
        "--data_output_path",
        str(out / "data_cache"),
    ]
    if step == 1:
        own = ["--model_name_or_path", args.actor_model, "--zero_stage", str(args.actor_zero_stage)]
    elif dpo:  # the step-1 actor against a frozen copy of itself
        own = ["--model_name_or_path", str(out / "actor"), "--zero_stage", str(args.actor_zero_stage)]
    elif step == 2:
        own = ["--model_name_or_path", args.reward_model, "--zero_stage", str(args.reward_zero_stage)]
    else:
        own = [
            "--actor_model_name_or_path",
            str(out / "actor"),
            "--critic_model_name_or_path",
            str(out / "reward"),
            "--actor_zero_stage",
            str(args.actor_zero_stage),
        ]
        if uses_critic(getattr(args, "advantage_estimator", "gae")):  # a critic-free step 3 builds no critic
            own += ["--critic_zero_stage", str(args.reward_zero_stage)]
        if args.enable_hybrid_engine:
            own.append("--enable_hybrid_engine")
        own += estimator_flags(args)
    target = out / output_name(step, args)
    extra = shlex.split(getattr(args, f"step{step}_args"))
    return [
        *launcher(args),
        str(script(step, args)),
        *common,
        *own,
        *shlex.split(defaults),
        "--output_dir",
        str(target),
        *extra,
    ]


def in_this_process(args: argparse.Namespace) -> bool:
    """The tiny demo on one device runs its steps in this process: no launcher is needed, and
    starting three more interpreters (~4 s of imports each) would dominate it. Real models keep one
    process per step, so each step starts with all device memory free."""
    return args.deployment_type == "single_device" and tiny_run(args)


def run_in_process(step: int, argv: list[str], path: Path | None = None) -> int:
    """Call step `step`'s `main(argv)` (the one at `path`, default its own) here; its exit code (user
    errors exit 2 with one line)."""
    path = path or SCRIPTS[step]
    spec = importlib.util.spec_from_file_location(f"dschat_hal_{path.parent.name}_main", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        gc.collect()
    return 0


def summary_line(step: int, result: dict) -> str:
    if step == 1:
        return f"perplexity {result['perplexity_before']:.1f} -> {result['perplexity']:.1f}"
    if step == 2 and "reward_margin" in result:  # DPO
        before = result["before"]
        return (
            f"DPO reward margin {before['reward_margin']:.3f} -> {result['reward_margin']:.3f}, "
            f"accuracy {before['accuracy']:.2f} -> {result['accuracy']:.2f}"
        )
    if step == 2:
        return f"accuracy {result['before']['accuracy']:.2f} -> {result['accuracy']:.2f}"
    history, evaluations = result["history"], result.get("evaluations") or []
    if not history:
        return "no PPO step ran"
    if len(evaluations) < 2:
        return f"{len(history)} PPO steps (no held-out evaluation: --eval_interval 0)"
    return (
        f"held-out reward {evaluations[0]['reward']:.3f} -> {evaluations[-1]['reward']:.3f} "
        f"(before -> after {evaluations[-1]['step']} PPO steps), kl {history[-1]['kl']:.4f}"
    )


def check_step_args(args: argparse.Namespace) -> str | None:
    """The first `--stepN-args` string that does not split like a shell line, as an error message."""
    for step in (1, 2, 3):
        value = getattr(args, f"step{step}_args")
        try:
            shlex.split(value)
        except ValueError as err:
            return f"--step{step}-args {value!r} cannot be split ({err}); balance the quotes"
    return None


def check_dpo_steps(args: argparse.Namespace) -> str | None:
    """`--dpo` replaces steps 2 and 3: a step 3, or step-3 flags, would have nothing to run on."""
    if not args.dpo:
        return None
    if 3 in args.step:
        return "--dpo replaces steps 2 and 3 (DPO runs as step 2, with no step 3): pass --step 1 2, or drop --dpo"
    given = step3_flags_given(args)
    if args.step3_args or args.advantage_estimator != "gae" or args.enable_hybrid_engine or given:
        return (
            "--dpo runs no step 3: drop --step3-args, --advantage-estimator, --enable-hybrid-engine"
            + "".join(f", {flag}" for flag in given)
            + ", or --dpo"
        )
    return None


def check_device_memory(args: argparse.Namespace) -> str | None:
    """`--device-memory` must be a positive size with its unit (checked before any step starts)."""
    if args.device_memory is None:
        return None
    from dschat_hal.memory_plan import parse_bytes

    try:
        parse_bytes(args.device_memory, flag="--device-memory")
    except UserError as err:
        return str(err)
    return None


def dry_run(args: argparse.Namespace, out: Path) -> int:
    """Each step's memory plan, from the commands the run would start (step 3 on the base models,
    which steps 1 and 2 would turn into its actor and critic; DPO on the actor's base model); 1 when one
    does not fit."""
    from dschat_hal import memory_plan
    from dschat_hal.args import dpo_parser, step1_parser, step2_parser, step3_parser
    from dschat_hal.configs import DPOStepConfig, Step1Config, Step2Config, Step3Config, to_config
    from dschat_hal.memory_plan.dpo import dpo_plan_for

    parsers = {1: step1_parser, 2: dpo_parser if args.dpo else step2_parser, 3: step3_parser}
    configs = {1: Step1Config, 2: DPOStepConfig if args.dpo else Step2Config, 3: Step3Config}
    code = 0
    for step in sorted(args.step):
        argv = step_command(step, args, out)[len(launcher(args)) + 1 :]
        if step == 3:
            argv += ["--actor_model_name_or_path", args.actor_model, "--critic_model_name_or_path", args.reward_model]
        if step == 2 and args.dpo:
            argv += ["--model_name_or_path", args.actor_model]
        if args.num_devices:
            argv += ["--num_devices", str(args.num_devices)]
        if args.device_memory:
            argv += ["--device_memory", args.device_memory]
        try:
            config = to_config(parsers[step]().parse_args(argv), configs[step])
            plan = dpo_plan_for(config) if step == 2 and args.dpo else memory_plan.plan_for(config, step)
        except UserError as err:
            print(f"error: step {step}: {err}", file=sys.stderr)
            return 2
        print(memory_plan.render(plan), flush=True)
        code = code or (1 if plan.fits is False else 0)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    problem = (
        check_step_args(args)
        or check_device_memory(args)
        or (f"--output-dir {out} is a file; pass a directory" if out.is_file() else None)
        or check_master_port(args)
        or check_dpo_steps(args)
        or check_step_flags(args, out)
    )
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(args, out)
    rows = []
    for step in sorted(args.step):
        if step == 3:
            for needed in ("actor", "reward"):
                if not (out / needed / "config.json").exists():
                    print(
                        f"error: step 3 needs {out / needed} (run steps 1 and 2 first, or pass --step 1 2 3)",
                        file=sys.stderr,
                    )
                    return 2
        if step == 2 and args.dpo and 1 not in args.step and not (out / "actor" / "config.json").exists():
            print(f"error: DPO needs step 1's actor at {out / 'actor'} (pass --step 1 2)", file=sys.stderr)
            return 2
        cmd = step_command(step, args, out)
        here = in_this_process(args)
        name = "step 2 (DPO)" if step == 2 and args.dpo else f"step {step}"
        print(f"==> {name}: {shlex.join(cmd)}{' (run in this process)' if here else ''}", flush=True)
        started = time.time()
        code = run_in_process(step, cmd[2:], script(step, args)) if here else subprocess.call(cmd)
        elapsed = time.time() - started
        if code != 0:
            print(f"error: step {step} failed with exit code {code} after {elapsed:.0f}s", file=sys.stderr)
            return code
        result = json.loads((out / output_name(step, args) / "training_summary.json").read_text())
        rows.append((step, elapsed, summary_line(step, result), result["output_dir"]))
    from dschat_hal.provenance import write_record

    write_record(out, vars(args), "e2e")  # beside the steps' outputs, each with its own record
    print("\n| step | time (s) | result | output |\n|---|---|---|---|")
    for step, elapsed, line, output in rows:
        print(f"| {step} | {elapsed:.0f} | {line} | {output} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
