"""The memory-plan tables of docs/memory-plan.md: OPT-1.3B/13B/66B with DeepSpeed-Chat's published settings and
Llama-2-7B/13B/70B with this project's Llama-2 recipe, planned from the configs in `model_configs/`;
then the Llama-2 recipes' step 3 with each critic-free estimator beside PPO's.

    python benchmarks/plan_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dschat_hal.configs import Step3Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "benchmarks" / "model_configs"
GIB = 2**30

# (model, hardware, ranks, memory, step-1 flags, step-2 flags, step-3 flags); critic/reward per row.
# OPT rows: upstream's training_scripts/opt/{single_gpu,single_node,multi_node} (steps 1 and 3) and
# step 2's opt-350m scripts; Llama rows: example_scripts/llama2 (ZeRO 1, LoRA 64 in step 3), with
# ZeRO-3, gradient checkpointing and the hybrid engine where the size needs them.
OPT_STEP3 = "--actor_lora_dim 128 --actor_gradient_checkpointing --actor_dropout 0.0 --enable_hybrid_engine"
RUNS = [
    ("OPT-1.3B", "opt-1.3b", "opt-350m", "1x A6000-48G", 1, "48GiB",
     "--zero_stage 0 --lora_dim 128 --per_device_train_batch_size 16",
     "--zero_stage 0 --per_device_train_batch_size 4 --dropout 0.0",
     f"--actor_zero_stage 0 --critic_zero_stage 0 {OPT_STEP3}"),
    ("OPT-13B", "opt-13b", "opt-350m", "8x A100-40G", 8, "40GiB",
     "--zero_stage 3 --lora_dim 128 --gradient_checkpointing --per_device_train_batch_size 4",
     "--zero_stage 0 --per_device_train_batch_size 4 --dropout 0.0",
     f"--actor_zero_stage 3 --critic_zero_stage 3 {OPT_STEP3} --inference_tp_size 2"),
    ("OPT-66B", "opt-66b", "opt-350m", "64x A100-80G", 64, "80GiB",
     "--zero_stage 3 --lora_dim 128 --gradient_checkpointing --per_device_train_batch_size 4",
     "--zero_stage 0 --per_device_train_batch_size 4 --dropout 0.0",
     f"--actor_zero_stage 3 --critic_zero_stage 3 {OPT_STEP3} --inference_tp_size 8 --tp_gather_partition_size 4 "
     "--per_device_generation_batch_size 4 --per_device_training_batch_size 4"),
    ("Llama-2-7B", "llama-2-7b", "llama-2-7b", "8x A100-80G", 8, "80GiB",
     "--zero_stage 1 --per_device_train_batch_size 8 --dropout 0.1",
     "--zero_stage 1 --per_device_train_batch_size 8 --dropout 0.1",
     "--actor_zero_stage 1 --critic_zero_stage 1 --actor_lora_dim 64 --critic_lora_dim 64 "
     "--per_device_generation_batch_size 4 --per_device_training_batch_size 4 --actor_dropout 0.0 "
     "--critic_dropout 0.0"),
    ("Llama-2-13B", "llama-2-13b", "llama-2-7b", "8x A100-80G", 8, "80GiB",
     "--zero_stage 3 --per_device_train_batch_size 8 --dropout 0.1 --gradient_checkpointing",
     "--zero_stage 1 --per_device_train_batch_size 8 --dropout 0.1",
     "--actor_zero_stage 3 --critic_zero_stage 3 --actor_lora_dim 64 --critic_lora_dim 64 "
     "--actor_gradient_checkpointing --enable_hybrid_engine --per_device_generation_batch_size 4 "
     "--per_device_training_batch_size 4 --actor_dropout 0.0 --critic_dropout 0.0"),
    ("Llama-2-70B", "llama-2-70b", "llama-2-7b", "64x A100-80G", 64, "80GiB",
     "--zero_stage 3 --per_device_train_batch_size 4 --dropout 0.1 --gradient_checkpointing",
     "--zero_stage 1 --per_device_train_batch_size 8 --dropout 0.1",
     "--actor_zero_stage 3 --critic_zero_stage 3 --actor_lora_dim 64 --critic_lora_dim 64 "
     "--actor_gradient_checkpointing --critic_gradient_checkpointing --enable_hybrid_engine --inference_tp_size 8 "
     "--per_device_generation_batch_size 4 --per_device_training_batch_size 4 --actor_dropout 0.0 "
     "--critic_dropout 0.0"),
]  # fmt: skip


# Step 3 of the Llama-2 recipes per --advantage_estimator, at the same answers per device as PPO's
# (--per_device_generation_batch_size 4): GRPO's N = 4 answers of 1 prompt, ReMax's 4 prompts (+ 4 greedy).
ESTIMATOR_RUNS = ("Llama-2-7B", "Llama-2-13B", "Llama-2-70B")
ESTIMATORS = [
    ("PPO (gae)", ""),
    ("GRPO N = 4", "--advantage_estimator grpo --n_samples_per_prompt 4 --per_device_generation_batch_size 1"),
    ("ReMax", "--advantage_estimator remax"),
]


def plans(run: tuple) -> list:
    from dschat_hal import memory_plan
    from dschat_hal.args import step1_parser, step2_parser, step3_parser
    from dschat_hal.configs import Step1Config, Step2Config, Step3Config, to_config

    _, actor, critic, _, ranks, memory, flags1, flags2, flags3 = run
    common = ["--dtype", "fp16"]  # planned for a GPU of the named size (no device needed here)
    argvs = {
        1: ["--model_name_or_path", str(CONFIGS / actor), *common, *flags1.split()],
        2: ["--model_name_or_path", str(CONFIGS / critic), *common, *flags2.split()],
        3: ["--actor_model_name_or_path", str(CONFIGS / actor), "--critic_model_name_or_path", str(CONFIGS / critic),
            *common, *flags3.split()],
    }  # fmt: skip
    parsers = {1: step1_parser, 2: step2_parser, 3: step3_parser}
    configs = {1: Step1Config, 2: Step2Config, 3: Step3Config}
    size = memory_plan.parse_bytes(memory)
    out = []
    for step in (1, 2, 3):
        config = to_config(parsers[step]().parse_args(argvs[step]), configs[step])
        plan = memory_plan.build(config, step, "gpu", ranks, size)  # step 3: decided as the run decides
        if plan.fits is False:
            plan.fix = memory_plan.find_fix(config, plan)
        out.append(plan)
    return out


def rows() -> list[str]:
    """One markdown row per model: peaks per rank of steps 1-3 (step 3's peak phase) and the verdict."""
    out = []
    for run in RUNS:
        name, _, critic, hardware, *_ = run
        p1, p2, p3 = plans(run)
        fixes = "; ".join(
            f"step {p.step}: {' '.join(p.fix) if p.fix else 'none found'}" for p in (p1, p2, p3) if not p.fits
        )
        cells = [
            name,
            critic.upper().replace("LLAMA", "Llama"),
            hardware,
            f"{p1.peak.total / GIB:.1f}",
            f"{p2.peak.total / GIB:.1f}",
            f"{p3.peak.total / GIB:.1f} ({p3.peak.name})",
            f"{p1.budget / GIB:.1f}",
            f"no; the plan adds {fixes}" if fixes else "yes",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def settings() -> list[str]:
    return [f"- {run[0]}: step 1 `{run[6]}`; step 2 `{run[7]}`; step 3 `{run[8]}`" for run in RUNS]


def _step3_args(run: tuple, extra: str) -> Step3Config:
    """Step 3's config of `run`'s flags with `extra` appended."""
    from dschat_hal.args import step3_parser
    from dschat_hal.configs import Step3Config, to_config

    _, actor, critic, _, _, _, _, _, flags3 = run
    argv = ["--actor_model_name_or_path", str(CONFIGS / actor), "--critic_model_name_or_path", str(CONFIGS / critic)]
    return to_config(
        step3_parser().parse_args([*argv, "--dtype", "fp16", *flags3.split(), *extra.split()]), Step3Config
    )


def estimator_rows() -> list[str]:
    """One markdown row per Llama-2 recipe: step 3's peak per rank with each of ESTIMATORS (frozen
    models placed as the run places them), and the critic-free peaks as a share of PPO's, as run and
    with the reference and reward placed as PPO's run places them."""
    import dataclasses

    from dschat_hal import memory_plan

    out = []
    for run in (r for r in RUNS if r[0] in ESTIMATOR_RUNS):
        name, _, critic, hardware, ranks, memory, *_ = run
        size = memory_plan.parse_bytes(memory)
        argses = [_step3_args(run, extra) for _, extra in ESTIMATORS]
        decided = [memory_plan.decide_for(args, "gpu", ranks, size) for args in argses]
        peaks = [memory_plan.build(args, 3, "gpu", ranks, size, d) for args, d in zip(argses, decided, strict=True)]
        ppo_decided = decided[0]  # the critic-free runs with the reference and reward where PPO's run places them
        pinned = [
            memory_plan.build(
                args,
                3,
                "gpu",
                ranks,
                size,
                dataclasses.replace(d, reference=ppo_decided.reference, reward=ppo_decided.reward),
            )
            for args, d in zip(argses[1:], decided[1:], strict=True)
        ]
        ppo = peaks[0].peak.total
        cells = [name, critic.upper().replace("LLAMA", "Llama"), hardware]
        cells += [f"{p.peak.total / GIB:.1f} ({p.peak.name})" for p in peaks]
        cells.append(" / ".join(f"{p.peak.total / ppo:.2f}" for p in peaks[1:]))
        cells.append(" / ".join(f"{p.peak.total / ppo:.2f}" for p in pinned))
        cells.append(f"{peaks[0].budget / GIB:.1f}")
        out.append("| " + " | ".join(cells) + " |")
    return out


def estimator_header() -> list[str]:
    names = [name for name, _ in ESTIMATORS]
    return [
        "| actor | reward | devices | "
        + " | ".join(f"step 3 {name} GiB" for name in names)
        + f" | {' / '.join(names[1:])} ÷ PPO | the same, frozen models placed as PPO's | usable GiB |",
        "|---" * (len(names) + 6) + "|",
    ]


def main() -> None:
    print(
        "| actor | critic/reward | devices | step 1 GiB | step 2 GiB | step 3 GiB (peak phase) | usable GiB | fits as set |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows()))
    print()
    print("\n".join(settings()))
    print()
    print("\n".join(estimator_header() + estimator_rows()))
    print()
    print("\n".join(f"- {name}: `{extra}`" for name, extra in ESTIMATORS[1:]))


if __name__ == "__main__":
    main()
