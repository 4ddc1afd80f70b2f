"""Shared fixtures: CPU environment, the fake HPU package, and one e2e run reused by several tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKES = Path(__file__).resolve().parent / "fakes"

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import accel  # noqa: E402  (sets the OpenMP wait defaults before torch loads; every test process inherits them)


def run_script(
    *args: str, env: dict | None = None, timeout: int = 600, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """Run a repo script with this interpreter; output captured as text."""
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    full_env = {k: v for k, v in os.environ.items() if k not in launcher_vars} | (env or {})
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, input=stdin
    )


def tiny_step3_argv(
    e2e_output: Path, tmp_path: Path, device: str = "cpu", prompt: int = 48, answer: int = 12, batch: int = 2
) -> list[str]:
    """Step-3 flags for a few quick PPO steps on the e2e run's actor and reward model, with the
    small-model settings the tiny models need (the defaults are upstream's, for real models)."""
    return [
        "--device",
        device,
        "--dtype",
        "fp32",
        "--data_output_path",
        str(tmp_path / "cache"),
        "--actor_model_name_or_path",
        str(e2e_output / "actor"),
        "--critic_model_name_or_path",
        str(e2e_output / "reward"),
        "--max_prompt_seq_len",
        str(prompt),
        "--max_answer_seq_len",
        str(answer),
        "--per_device_generation_batch_size",
        str(batch),
        "--per_device_training_batch_size",
        str(batch),
        *TINY_STEP3_OPTIM,
    ]


def tiny_step1_argv(tmp_path: Path, *extra: str) -> list[str]:
    """Step-1/2 flags for short CPU runs: a private data cache, 64 tokens, batches of 8."""
    return [
        *("--device", "cpu", "--data_output_path", str(tmp_path / "cache"), "--max_seq_len", "64"),
        *("--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8"),
        *extra,
    ]


# The step-3 optimisation the tiny models train with (upstream's defaults are for billion-parameter models).
TINY_STEP3_OPTIM = [
    "--actor_learning_rate",
    "5e-4",
    "--critic_learning_rate",
    "5e-4",
    "--num_warmup_steps",
    "0",
    "--actor_dropout",
    "0.0",
    "--critic_dropout",
    "0.0",
]


def import_fake_hpu():
    """(Re)import the fake bridge, which fixes lazy or eager mode from PT_HPU_LAZY_MODE as it imports."""
    for name in [m for m in sys.modules if m.startswith("habana_frameworks")]:
        sys.modules.pop(name)
    import habana_frameworks.torch as htorch

    htorch.core.reset()
    htorch.hpu.reset()
    htorch.hpex.optimizers.reset()
    htorch.dynamo.reset()
    return htorch


@pytest.fixture
def fake_hpu(monkeypatch):
    """Make the recording fake of `habana_frameworks` importable; removed again afterwards. The HPU
    environment defaults are set first, as `accel/__init__` does in a process that will use the HPU."""
    from accel._hpu_env import HPU_ENV_DEFAULTS

    monkeypatch.syspath_prepend(str(FAKES))
    for name in [m for m in sys.modules if m.startswith("habana_frameworks")]:
        monkeypatch.delitem(sys.modules, name)
    for key, value in HPU_ENV_DEFAULTS.items():
        monkeypatch.setenv(key, os.environ.get(key, value))
    htorch = import_fake_hpu()
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    yield htorch
    for name in [m for m in sys.modules if m.startswith("habana_frameworks")]:
        sys.modules.pop(name)

    accel.get("cpu")


@pytest.fixture
def fake_optimum_habana(fake_hpu, monkeypatch):
    """The fake HPU plus the double of optimum-habana (`tests/fakes/optimum_habana`): the HPU backend
    then applies its patch (Llama only). Everything it replaces in torch and transformers is put back."""
    import torch.utils.checkpoint
    import transformers
    import transformers.modeling_utils
    from transformers.models.llama import modeling_llama

    monkeypatch.syspath_prepend(str(FAKES / "optimum_habana"))
    for name in [m for m in sys.modules if m == "optimum" or m.startswith("optimum.")]:
        monkeypatch.delitem(sys.modules, name)
    for owner, name in (
        (torch.utils.checkpoint, "checkpoint"),
        (transformers.modeling_utils, "checkpoint"),
        (modeling_llama, "LlamaForCausalLM"),
    ):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored after the test
    mapping = transformers.AutoModelForCausalLM._model_mapping
    monkeypatch.setattr(mapping, "_extra_content", dict(mapping._extra_content))
    import optimum.habana.transformers.gradient_checkpointing
    import optimum.habana.transformers.models.llama

    yield optimum.habana
    for name in [m for m in sys.modules if m == "optimum" or m.startswith("optimum.")]:
        sys.modules.pop(name)


@pytest.fixture(scope="session")
def e2e_output(tmp_path_factory) -> Path:
    """The README's demo (all three steps, tiny OPT, CPU), run once as a user would."""
    out = tmp_path_factory.mktemp("e2e") / "output"
    result = run_script("training/e2e_rlhf.py", "--output-dir", str(out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (out / "e2e_stdout.txt").write_text(result.stdout)
    return out


@pytest.fixture(autouse=True)
def default_output_root(tmp_path_factory, monkeypatch):
    """A step run without --output_dir saves to output/<name> under the current directory: in tests,
    under a fresh temporary directory instead of the repository (in-process runs)."""
    import dschat_hal.args

    monkeypatch.setattr(dschat_hal.args, "DEFAULT_OUTPUT_ROOT", str(tmp_path_factory.mktemp("default_output")))
