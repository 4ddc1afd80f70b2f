"""The typed step configs (`dschat_hal/configs.py`) and the command line built from them (issue #31):
every flag keeps the name, default, choices and help it had, a config and its flags map both ways, and
the configs load without torch (`--help` is answered before torch loads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from dschat_hal import args as cli
from dschat_hal.configs import DPOStepConfig, RLHFModelConfig, Step1Config, Step2Config, Step3Config

# the four parsers' flags as the hand-written argparse code defined them before the configs (issue #31)
SNAPSHOT = json.loads((Path(__file__).parent / "data" / "parser_flags.json").read_text())
PARSERS = {
    "step1_parser": Step1Config,
    "step2_parser": Step2Config,
    "dpo_parser": DPOStepConfig,
    "step3_parser": Step3Config,
}
RENAMED_TYPES = {"_bool": "parse_bool"}  # args._bool moved to configs.parse_bool, the same function
REQUIRED = {"step3_parser": ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c"]}


def _flags(parser) -> dict:
    return {
        a.dest: {
            "flags": a.option_strings,
            "default": a.default,
            "choices": list(a.choices) if a.choices else None,
            "help": a.help,
            "nargs": a.nargs,
            "required": a.required,
            "const": a.const,
            "type": getattr(a.type, "__name__", None),
            "metavar": a.metavar,
            "action": type(a).__name__,
        }
        for a in parser._actions
        if a.dest != "help"
    }


@pytest.mark.parametrize("name", PARSERS)
def test_every_flag_keeps_its_name_default_choices_and_help(name):
    parser, before = getattr(cli, name)(), SNAPSHOT[name]
    now = json.loads(json.dumps(_flags(parser), default=str))
    assert sorted(now) == sorted(before["actions"])
    for dest, was in before["actions"].items():
        was = {**was, "type": RENAMED_TYPES.get(was["type"], was["type"])}
        assert now[dest] == was, dest
    assert parser.description == before["description"]
    assert [sorted(a.dest for a in g._group_actions) for g in parser._mutually_exclusive_groups] == before["exclusive"]
    for dest, value in before["set_defaults"].items():  # the step's own defaults (lr, output name, ...)
        assert parser.get_default(dest) == value, dest


@pytest.mark.parametrize("name", PARSERS)
def test_a_config_and_its_flags_map_both_ways(name):
    """The parsed defaults are the config's defaults, and parsed flags give a config that gives them back."""
    config_class, parser = PARSERS[name], getattr(cli, name)()
    required = REQUIRED.get(name, [])
    parsed = parser.parse_args(required)
    made = Step3Config(models=RLHFModelConfig("a", "c")) if config_class is Step3Config else config_class()
    flags = {k: v for k, v in vars(parsed).items() if k != "output_name"}
    assert cli.to_flags(made) == flags
    assert cli.to_config(parsed, config_class) == made
    changed = parser.parse_args([*required, "--seed", "7", "--data_path", "x", "y", "--bucket_lengths", "8", "16"])
    config = cli.to_config(changed, config_class)
    assert (config.hardware.seed, config.data.data_path, config.hardware.bucket_lengths) == (7, ["x", "y"], [8, 16])
    assert cli.to_flags(config) == {k: v for k, v in vars(changed).items() if k != "output_name"}


def test_step3_prefixed_parts_and_step_defaults():
    args = cli.step3_parser().parse_args(
        [*REQUIRED["step3_parser"], "--actor_zero_stage", "3", "--critic_lora_dim", "4", "--kl_ctl", "0.2"]
    )
    config = cli.to_config(args, Step3Config)
    assert (config.actor.zero_stage, config.critic.zero_stage, config.critic.lora_dim) == (3, 0, 4)
    assert config.ppo.kl_ctl == 0.2 and config.models.actor_model_name_or_path == "a"
    plain = Step3Config(models=RLHFModelConfig("a", "c"))
    rates = (plain.actor.learning_rate, plain.critic.learning_rate)
    assert rates == (9.65e-6, 5e-6) and plain.schedule.num_warmup_steps == 100
    assert plain.logging.tensorboard_path == "step3_tensorboard" and plain.has_critic()
    assert Step1Config().optim.learning_rate == 1e-3 and Step2Config().optim.learning_rate == 5e-5


def test_the_configs_and_the_parsers_load_without_torch():
    code = (
        "import sys, dschat_hal.configs, dschat_hal.args as a; a.step3_parser(); "
        "heavy = {'torch', 'transformers', 'deepspeed'} & set(sys.modules); assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_with_flags_changes_each_flag_in_the_part_that_holds_it():
    """What `memory_plan.find_fix` tries: flags by their names, applied with `dataclasses.replace` per part."""
    from dschat_hal.configs import to_flags, with_flags

    config = Step3Config(models=RLHFModelConfig("tiny-opt", "tiny-opt"))
    changes = {"actor_zero_stage": 3, "offload_reference_model": True, "only_optimize_lora": True}
    changed = with_flags(config, changes)
    assert changed.actor.zero_stage == 3 and changed.critic.zero_stage == 0
    assert changed.frozen.offload_reference_model and changed.schedule.only_optimize_lora
    assert to_flags(changed) == {**to_flags(config), **changes}
    assert config.actor.zero_stage == 0 and not config.frozen.offload_reference_model  # the original is unchanged
    assert changed.ppo is config.ppo  # parts without a change are shared
    with pytest.raises(KeyError, match="Step3Config has no flag zero_stage"):
        with_flags(config, {"zero_stage": 3})  # steps 1 and 2's flag: step 3 has actor_ and critic_ ones


def test_the_memory_plan_and_the_decisions_take_the_step_config():
    """No Namespace below the command line: the plan, its fix and the decisions read a step's config."""
    from dschat_hal import memory_plan
    from dschat_hal.decisions import decide, experience_rows

    configs = ROOT / "benchmarks" / "model_configs"
    step1 = Step1Config()
    step1.model.model_name_or_path = str(configs / "opt-1.3b")
    plan = memory_plan.build(step1, 1, "cuda", 8, 4 * 2**30)
    assert plan.fits is False and memory_plan.find_fix(step1, plan)[0].startswith("--")
    step3 = Step3Config(models=RLHFModelConfig("tiny-opt", "tiny-opt"))
    assert experience_rows(step3) == 16 and decide(step3, 2).critic


# ---- steps 1, 2 and DPO: the library takes configs (issue #31 item 3) ------------------------------------
CONFIG_TAKING_MODULES = ("dschat_hal/loop.py", "dschat_hal/provenance.py", "dschat_hal/monitor.py")
SUPERVISED_MAINS = {
    "training/step1_supervised_finetuning/main.py": "Step1Config",
    "training/step2_reward_model_finetuning/main.py": "Step2Config",
    "training/step2_dpo_finetuning/main.py": "DPOStepConfig",
}


def test_the_supervised_steps_convert_their_flags_once_and_their_library_takes_no_namespace():
    for module in CONFIG_TAKING_MODULES:
        assert "argparse" not in (ROOT / module).read_text(), f"{module} still reads a Namespace"
    for main, config_class in SUPERVISED_MAINS.items():
        text = (ROOT / main).read_text()
        assert text.count("to_config(") == 1 and f"to_config(args, {config_class})" in text, main
        # past the conversion the flags only reach the edge: start-up lines, the record, the memory plan
        assert "args, writer" not in text and "(args, 1, tokenizer" not in text and "(args, 2, tokenizer" not in text


def test_resume_setup_from_a_config_keeps_the_keys_older_checkpoints_hold():
    """The setup a checkpoint unit stores, as units saved before the configs hold it: a run resumes them."""
    import torch

    from dschat_hal.loop import resume_setup

    saved_before = {
        "model_name_or_path": "tiny-opt",
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "zero_stage": 0,
        "lora_dim": 0,
        "offload": False,
        "world_size": 1,
        "dtype": "torch.float32",
    }
    args = cli.validate(cli.step1_parser().parse_args(["--per_device_train_batch_size", "8", "--output_dir", ""]))
    assert resume_setup(cli.to_config(args, Step1Config), torch.float32) == saved_before
    step3 = cli.to_config(cli.step3_parser().parse_args(REQUIRED["step3_parser"]), Step3Config)
    keys = set(resume_setup(step3, torch.bfloat16))
    assert keys >= {"actor_model_name_or_path", "critic_zero_stage", "actor_lora_dim", "enable_ema", "dtype"}


def test_an_optimiser_part_without_a_learning_rate_is_one_line():
    """A part built in Python misses the step's default learning rate (it lives in the step config)."""
    from dschat_hal.configs import HardwareConfig, LoggingConfig, OptimConfig, ScheduleConfig
    from dschat_hal.errors import UserError
    from dschat_hal.runtime import engine_from_config

    assert OptimConfig().learning_rate is None and Step3Config(RLHFModelConfig("a", "b")).actor.learning_rate
    with pytest.raises(UserError, match="step3_actor: the optimiser config has no learning_rate") as err:
        engine_from_config(None, None, OptimConfig(), ScheduleConfig(), HardwareConfig(), LoggingConfig(),
                           dtype=None, total_steps=1, micro_batch=1, job_name="step3_actor")  # fmt: skip
    assert "\n" not in str(err.value)
