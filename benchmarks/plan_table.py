"""The README's memory-plan table: OPT-1.3B/13B/66B with DeepSpeed-Chat's published settings and
Llama-2-7B/13B/70B with this project's Llama-2 recipe, planned from the configs in `model_configs/`.

    python benchmarks/plan_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

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


def plans(run: tuple) -> list:
    from dschat_hal import memory_plan
    from dschat_hal.args import step1_parser, step2_parser, step3_parser

    _, actor, critic, _, ranks, memory, flags1, flags2, flags3 = run
    common = ["--dtype", "fp16"]  # planned for a GPU of the named size (no device needed here)
    argvs = {
        1: ["--model_name_or_path", str(CONFIGS / actor), *common, *flags1.split()],
        2: ["--model_name_or_path", str(CONFIGS / critic), *common, *flags2.split()],
        3: ["--actor_model_name_or_path", str(CONFIGS / actor), "--critic_model_name_or_path", str(CONFIGS / critic),
            *common, *flags3.split()],
    }  # fmt: skip
    parsers = {1: step1_parser, 2: step2_parser, 3: step3_parser}
    size = memory_plan.parse_bytes(memory)
    out = []
    for step in (1, 2, 3):
        args = parsers[step]().parse_args(argvs[step])
        if step == 3:  # as the run decides it
            memory_plan.decide_critic_graph(args, "gpu", ranks, size)
        plan = memory_plan.build(args, step, "gpu", ranks, size)
        if plan.fits is False:
            plan.fix = memory_plan.find_fix(args, plan)
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


def main() -> None:
    print(
        "| actor | critic/reward | devices | step 1 GiB | step 2 GiB | step 3 GiB (peak phase) | usable GiB | fits as set |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows()))
    print()
    print("\n".join(settings()))


if __name__ == "__main__":
    main()
