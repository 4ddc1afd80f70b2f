"""`--help` is answered before torch, transformers and DeepSpeed load (a blink, not 11-39 s), with the
same text as before; a real run still sets the environment defaults before torch loads (issue 30)."""

from __future__ import annotations

import os

import pytest
from conftest import ROOT, run_script

from dschat_hal.args import DefaultsHelpFormatter, dpo_parser, step1_parser, step2_parser, step3_parser

HEAVY = {"torch", "transformers", "deepspeed"}
STEP_MAINS = {
    "training/step1_supervised_finetuning/main.py": step1_parser,
    "training/step2_reward_model_finetuning/main.py": step2_parser,
    "training/step2_dpo_finetuning/main.py": dpo_parser,
    "training/step3_rlhf_finetuning/main.py": step3_parser,
}


def _chat_parser():
    from training.chat import _parser

    return _parser()


# entry point (and arguments) -> (parser that main uses, a flag with its default as --help shows them)
CASES = {
    **{path: (make, "--zero_stage") for path, make in STEP_MAINS.items() if "step3" not in path},
    "training/step3_rlhf_finetuning/main.py": (step3_parser, "--actor_zero_stage"),
    "training/chat.py": (_chat_parser, "--max_new_tokens"),
    "training/e2e_rlhf.py": (None, "default: 1 2 3 (with --dpo: 1 2)"),
    "training/plan.py": (None, "usage: training/plan.py {1,2,dpo,3} [the step's flags]"),
    "training/plan.py 3": (step3_parser, "--actor_zero_stage"),
}


def _env() -> dict:
    return {"COLUMNS": "100", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _imported(importtime_stderr: str) -> list[str]:
    """Modules in the order `-X importtime` reports them done."""
    lines = importtime_stderr.splitlines()
    return [line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")]


@pytest.mark.parametrize("entry", CASES)
def test_help_is_answered_before_torch_loads(entry, monkeypatch):
    make_parser, shown = CASES[entry]
    result = run_script("-X", "importtime", *entry.split(), "--help", env=_env(), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    loaded = sorted(HEAVY & set(_imported(result.stderr)))
    assert not loaded, f"--help imported {loaded}"
    text = " ".join(result.stdout.split())
    if make_parser is None:
        assert shown in text
        return
    monkeypatch.setenv("COLUMNS", "100")  # the width the subprocess wrapped at
    parser = make_parser()
    parser.prog = os.path.basename(entry.split()[0])
    assert result.stdout == parser.format_help()  # the full help, as main's own parser prints it
    assert f"{shown} " in text
    if parser.formatter_class is DefaultsHelpFormatter:  # chat's help shows no defaults, and did not before
        assert f"(default: {parser._option_string_actions[shown].default})" in text


@pytest.mark.parametrize(
    "entry", ["training/step2_reward_model_finetuning/main.py", "training/step2_dpo_finetuning/main.py"]
)
def test_a_real_run_sets_the_environment_defaults_before_torch(entry):
    """Not `--help`: the heavy imports follow `accel`'s, which set the OpenMP and Gaudi defaults
    (steps 1, 3 and chat: tests/test_chat.py)."""
    result = run_script("-X", "importtime", entry, "--no_such_flag", env=_env(), timeout=300)
    assert result.returncode == 2 and "unrecognized arguments: --no_such_flag" in result.stderr
    done = _imported(result.stderr)
    assert max(done.index("accel._openmp"), done.index("accel._hpu_env")) < done.index("torch")
