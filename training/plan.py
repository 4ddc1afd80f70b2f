"""The memory plan of a step, from model configs alone (no weights loaded, nothing written).

    python training/plan.py 1 --model_name_or_path facebook/opt-1.3b --device cuda --num_devices 1 --device_memory 48GiB
    python training/plan.py 3 --actor_model_name_or_path facebook/opt-13b --critic_model_name_or_path \\
        facebook/opt-350m --actor_zero_stage 3 --critic_zero_stage 3 --enable_hybrid_engine \\
        --device cuda --num_devices 8 --device_memory 40GiB

    python training/plan.py dpo --model_name_or_path facebook/opt-1.3b --device cuda --num_devices 1 --device_memory 48GiB

The first argument is the step (1, 2, 3, or dpo: step 2's alternative); the rest are that step's own flags (its `--help`), so a
plan is read exactly as the step would read it; `--device` names the hardware planned for (auto: this
machine's). `--dry_run` on a step prints the same plan. Exit
code 0 when it fits (or the device memory is unknown), 1 when it does not.
"""

from __future__ import annotations

import sys

from dschat_hal import memory_plan
from dschat_hal.args import dpo_parser, step1_parser, step2_parser, step3_parser
from dschat_hal.configs import DPOStepConfig, Step1Config, Step2Config, Step3Config, to_config
from dschat_hal.errors import cli_entry
from dschat_hal.memory_plan.dpo import dpo_plan_for

PARSERS = {"1": step1_parser, "2": step2_parser, "dpo": dpo_parser, "3": step3_parser}
CONFIGS = {"1": Step1Config, "2": Step2Config, "dpo": DPOStepConfig, "3": Step3Config}
USAGE = "usage: training/plan.py {1,2,dpo,3} [the step's flags]"


@cli_entry
def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return 0
    if not argv or argv[0] not in PARSERS:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    config = to_config(PARSERS[argv[0]]().parse_args(argv[1:]), CONFIGS[argv[0]])
    plan = dpo_plan_for(config) if argv[0] == "dpo" else memory_plan.plan_for(config, int(argv[0]))
    print(memory_plan.render(plan))
    return 1 if plan.fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
