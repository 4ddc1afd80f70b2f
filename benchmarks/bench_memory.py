"""The memory plan against measured peaks on the CPU: steps 1-3 at three model sizes.

    python benchmarks/bench_memory.py --work /tmp/bench_memory [--sizes small medium] [--steps 1 2 3]
        [--estimators gae grpo remax] [--n_samples 2]

Each step runs in its own process (one rank, `--device cpu`); its peak is the process's VmHWM
(peak resident set, read at exit: on the CPU "device memory" is host memory). The plan of the
same flags (`dschat_hal.memory_plan`, no weights read) is printed beside it, with and without the
CPU process baseline (interpreter, torch, DeepSpeed, transformers, data), which `--sizes tiny`
measures with the built-in 0.3M-parameter model. Models are random OPT shapes written to
`--work` with the bundled tokenizer; the data are synthetic rows long enough to fill every batch
to `--max_seq_len` (steps 1-2) and prompts just under `--max_prompt_seq_len` (step 3).

`--estimators` runs step 3 once per `--advantage_estimator` (step 3 needs that size's step-1 and
step-2 outputs in `--work`: run steps 1 and 2 first). Every estimator generates and trains on the same
`--batch` answers per device: N = `--n_samples` answers per prompt for grpo/rloo, whose generation
batch is then `--batch` / N prompts; one answer per prompt otherwise (remax adds its greedy answers
in the same phase). A second table sets each critic-free peak beside PPO's (`gae`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dschat_hal.rlhf.advantages import ESTIMATORS  # noqa: E402

SIZES = {  # OPT shapes: hidden, layers, ffn, vocab
    "small": (512, 8, 2048, 8192),
    "medium": (768, 12, 3072, 8192),
    "large": (1024, 16, 4096, 8192),  # ~0.2B: the critic's share of the peak, with the baseline small beside it
}
SCRIPTS = {
    1: ROOT / "training/step1_supervised_finetuning/main.py",
    2: ROOT / "training/step2_reward_model_finetuning/main.py",
    3: ROOT / "training/step3_rlhf_finetuning/main.py",
}
# Records the process's VmHWM at exit (also after SystemExit), then runs the step as __main__.
WRAPPER = """
import atexit, os, runpy, sys
def _peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(os.environ['PEAK_FILE'], 'w').write(str(int(line.split()[1]) * 1024))
atexit.register(_peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def make_model(work: Path, size: str) -> Path:
    """A random OPT of `size` saved with the bundled tokenizer (once)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    from dschat_hal.models.tiny import TOKENIZER_DIR

    out = work / f"opt-{size}"
    if (out / "model.safetensors").exists():
        return out
    hidden, layers, ffn, vocab = SIZES[size]
    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        ffn_dim=ffn,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for item in TOKENIZER_DIR.iterdir():
        shutil.copy(item, out / item.name)
    return out


def make_data(work: Path, prompt_tokens: int, rows: int = 96) -> Path:
    """prompt/chosen/rejected rows: prompts of just under `prompt_tokens`, answers of ~600 tokens."""
    from dschat_hal.models.lm import load_tokenizer

    out = work / "data"
    if (out / "train.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer("tiny-opt")
    words = "the a model learns to answer questions about memory planning and device use well".split()
    rng = random.Random(0)

    def text(tokens: int) -> str:
        picked: list[str] = []
        while len(tokenizer(" ".join(picked + ["x"]))["input_ids"]) < tokens:
            picked.append(rng.choice(words))
        return " ".join(picked)

    def row() -> dict:
        return {"prompt": text(prompt_tokens - 4), "chosen": text(600), "rejected": text(600)}

    for name, count in (("train.json", rows), ("test.json", 12)):
        (out / name).write_text(json.dumps([row() for _ in range(count)]))
    return out


GROUP_ESTIMATORS = ("grpo", "rloo")  # N >= 2 answers per prompt


def estimator_flags(estimator: str, batch: int, n_samples: int) -> list[str]:
    """Step 3's flags for `estimator` at `batch` answers per device (prompts x N = `batch`);
    none for `gae`, so PPO's flags (and its recorded peaks) are those of the steps-1-3 table."""
    if estimator == "gae":
        return []
    flags = ["--advantage_estimator", estimator]
    if estimator in GROUP_ESTIMATORS:
        if n_samples < 2 or batch % n_samples:
            raise SystemExit(
                f"error: --estimators {estimator} needs --n_samples N >= 2 dividing --batch {batch} (got {n_samples}); "
                "pick N among the divisors of --batch"
            )
        flags += [
            "--n_samples_per_prompt",
            str(n_samples),
            "--per_device_generation_batch_size",
            str(batch // n_samples),
        ]
    return flags


def step_argv(
    step: int, model: str, critic: str | None, data: Path, work: Path, size: str, args, estimator: str = "gae"
) -> list[str]:
    common = ["--device", "cpu", "--dtype", args.dtype, "--data_path", str(data), "--data_split", "1,1,1"]
    common += ["--data_output_path", str(work / f"cache-{size}"), "--quiet"]
    out = str(work / (f"out-{size}-step{step}" + ("" if estimator == "gae" else f"-{estimator}")))
    if step in (1, 2):
        return [
            *common,
            *("--model_name_or_path", model, "--zero_stage", str(args.zero_stage)),
            *("--max_seq_len", str(args.seq), "--per_device_train_batch_size", str(args.batch)),
            *("--per_device_eval_batch_size", "2", "--max_steps", "3", "--output_dir", out),
            *(("--eval_iters", "1") if step == 2 else ()),
        ]
    return [
        *common,
        *("--actor_model_name_or_path", model, "--critic_model_name_or_path", critic),
        *("--actor_zero_stage", str(args.zero_stage3), "--critic_zero_stage", str(args.zero_stage3)),
        *("--max_prompt_seq_len", str(args.prompt), "--max_answer_seq_len", str(args.answer)),
        *("--per_device_generation_batch_size", str(args.batch), "--per_device_training_batch_size", str(args.batch)),
        *("--enable_hybrid_engine", "--greedy_generation", "--num_warmup_steps", "0", "--output_dir", out),
        *("--enable_test_mode", "--test_stop_step", "3"),
        *(("--allow_random_critic",) if critic.startswith("tiny-") else ()),
        *estimator_flags(estimator, args.batch, args.n_samples),  # the last generation batch size wins
    ]


def measure(step: int, argv: list[str], work: Path) -> int:
    peak_file = work / f"peak-{os.getpid()}"
    env = {**os.environ, "PEAK_FILE": str(peak_file), "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(SCRIPTS[step]), *argv], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"step {step} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return int(peak_file.read_text())


def planned(step: int, argv: list[str]) -> tuple[float, float]:
    """(plan's peak with the CPU baseline, the baseline) in bytes."""
    from dschat_hal import memory_plan
    from dschat_hal.args import step1_parser, step2_parser, step3_parser
    from dschat_hal.configs import Step1Config, Step2Config, Step3Config, to_config

    parser = {1: step1_parser, 2: step2_parser, 3: step3_parser}[step]()
    config = to_config(parser.parse_args(argv), {1: Step1Config, 2: Step2Config, 3: Step3Config}[step])
    plan = memory_plan.build(config, step, "cpu", 1, None)
    return plan.peak.total, memory_plan.CPU_BASELINE_BYTES[step]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_memory"))
    p.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=["tiny", *SIZES])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--zero_stage3", type=int, default=2, help="ZeRO stage of step 3's actor and critic")
    p.add_argument("--batch", type=int, default=4, help="rows per device (step 3: answers generated and trained on)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--answer", type=int, default=64)
    p.add_argument(
        "--estimators",
        nargs="+",
        default=["gae"],
        choices=list(ESTIMATORS),
        help="step 3's --advantage_estimator, one run each (default: gae, PPO)",
    )
    p.add_argument("--n_samples", type=int, default=2, help="answers per prompt of grpo/rloo (--batch / N prompts)")
    p.add_argument(
        "--replan", action="store_true", help="re-plan the peaks measured before (WORK/measured.json), run nothing"
    )
    args = p.parse_args()
    for estimator in args.estimators:  # refuse before running anything
        estimator_flags(estimator, args.batch, args.n_samples)
    args.work.mkdir(parents=True, exist_ok=True)
    record = args.work / "measured.json"
    measured = json.loads(record.read_text()) if record.exists() else {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = make_data(args.work, args.prompt)
    MB = 1024**2
    from accel.cpu import describe_cpu

    print(f"{os.cpu_count()} CPUs ({describe_cpu()})\n")
    print("| size | step | measured VmHWM MB | plan MB | plan/measured | measured - baseline MB | plan - baseline MB |")
    print("|---|---|---|---|---|---|---|")
    step3: dict[tuple[str, str], tuple[int, float]] = {}  # (size, estimator) -> (measured, plan)
    for size in args.sizes:
        if size == "tiny":
            model = "tiny-opt"
        else:  # re-planning needs only the configs the measuring run wrote
            model = str(args.work / f"opt-{size}" if args.replan else make_model(args.work, size))
        for step in args.steps:
            if step == 3:
                actor = model if size == "tiny" else str(args.work / f"out-{size}-step1")
                critic = model if size == "tiny" else str(args.work / f"out-{size}-step2")
            else:
                actor, critic = model, None
            for estimator in args.estimators if step == 3 else ["gae"]:
                argv = step_argv(step, actor, critic, data, args.work, size, args, estimator)
                key = " ".join([str(step), *argv])
                if not args.replan:
                    measured[key] = measure(step, argv, args.work)
                    record.write_text(json.dumps(measured, indent=1))
                if key not in measured:
                    continue
                peak = measured[key]
                plan, base = planned(step, argv)
                if step == 3:
                    step3[size, estimator] = (peak, plan)
                label = f"3 ({estimator})" if step == 3 and args.estimators != ["gae"] else str(step)
                print(
                    f"| {size} | {label} | {peak / MB:.0f} | {plan / MB:.0f} | {plan / peak:.2f} | "
                    f"{(peak - base) / MB:.0f} | {(plan - base) / MB:.0f} |",
                    flush=True,
                )
    if len({estimator for _, estimator in step3}) > 1:
        print(estimator_table(step3, args.batch, args.n_samples))


def estimator_table(step3: dict[tuple[str, str], tuple[int, float]], batch: int, n_samples: int) -> str:
    """Step 3's peaks per estimator beside the plan's and PPO's (`gae`) of the same size."""
    MB = 1024**2
    lines = [
        "",
        "| size | estimator | answers per prompt x prompts | measured VmHWM MB | plan MB | plan/measured | "
        "critic-free / PPO measured | critic-free / PPO plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (size, estimator), (peak, plan) in step3.items():
        n = n_samples if estimator in GROUP_ESTIMATORS else 1
        ppo = step3.get((size, "gae"))
        ratios = ("-", "-") if ppo is None or estimator == "gae" else (f"{peak / ppo[0]:.2f}", f"{plan / ppo[1]:.2f}")
        lines.append(
            f"| {size} | {estimator} | {n} x {batch // n} | {peak / MB:.0f} | {plan / MB:.0f} | {plan / peak:.2f} | "
            f"{ratios[0]} | {ratios[1]} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
