"""Shared fixtures: CPU environment, the fake HPU package, and one e2e run reused by several tests."""

from __future__ import annotations

import json
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

OPTIMUM_HABANA_INSTALL = ".venv/bin/pip install -q --no-deps --target .venv/optimum-habana -r requirements-hpu-test.txt"


def optimum_habana_site() -> Path:
    """Where the real optimum-habana for the tests lives (`requirements-hpu-test.txt`, installed with
    `--target` beside the CPU stack): $OPTIMUM_HABANA_SITE, else `optimum-habana` in this interpreter's venv."""
    return Path(os.environ.get("OPTIMUM_HABANA_SITE") or Path(sys.prefix) / "optimum-habana")


def real_gaudi_env(extra: dict | None = None, optimum_habana: bool = True) -> dict:
    """A child process's environment for the real optimum-habana on the bridge stand-in (`tests/fakes`):
    both on PYTHONPATH (never in this process: `adapt_transformers_to_gaudi()` patches a process for
    good), this venv's `pip` first on PATH (optimum-habana reads the SynapseAI version from `pip list`)."""
    site = optimum_habana_site()
    if optimum_habana and not (site / "optimum" / "habana").is_dir():
        pytest.fail(f"the real optimum-habana is not installed for the tests at {site}: run {OPTIMUM_HABANA_INSTALL}")
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in launcher_vars and not k.startswith("PT_HPU_") and k not in ("ACCEL_DEVICE", "DS_ACCELERATOR")
    }
    paths = [str(ROOT), str(FAKES), *([str(site)] if optimum_habana else [])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env | (extra or {})


def run_real_gaudi(
    code: str, *args: str, env: dict | None = None, optimum_habana: bool = True, timeout: int = 900
) -> dict:
    """Run `code` (with `args` in sys.argv[1:]) in a child process on the bridge stand-in and the real
    optimum-habana; it prints one JSON object as its last line, returned with the child's `stderr`."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=real_gaudi_env(env, optimum_habana),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1]) | {"stderr": result.stderr}


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


def train_engine(
    backend,
    model,
    stage: int = 0,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    dtype=None,
    total_steps: int = 4,
    micro_batch: int = 3,
):
    """A training DeepSpeed engine of `model` as the steps build one (constant lr, default hardware)."""
    import torch

    from dschat_hal.configs import HardwareConfig, LoggingConfig, OptimConfig, ScheduleConfig
    from dschat_hal.runtime import engine_from_config

    backend.init_distributed()
    return engine_from_config(
        backend, model,
        OptimConfig(learning_rate=lr, weight_decay=weight_decay, lora_learning_rate=1e-3, zero_stage=stage),
        ScheduleConfig(lr_scheduler_type="constant"), HardwareConfig(), LoggingConfig(),
        dtype=torch.float32 if dtype is None else dtype, total_steps=total_steps, micro_batch=micro_batch,
        job_name="train",
    )  # fmt: skip


def save_tiny_rlhf_models(root: Path) -> Path:
    """A tiny actor (`root/actor`, seed 1) and reward model (`root/reward`, seed 2) saved as steps 1 and 2
    would save them (random weights, no training): step 3's inputs in tests."""
    from dschat_hal.models import create_lm, create_reward_model, load_tokenizer, save_lm

    tokenizer = load_tokenizer("tiny-opt")
    save_lm(create_lm("tiny-opt", tokenizer, seed=1), tokenizer, root / "actor")
    create_reward_model("tiny-opt", tokenizer, seed=2).save(root / "reward", tokenizer)
    return root


def import_fake_hpu():
    """(Re)import the fake bridge, which fixes lazy or eager mode from PT_HPU_LAZY_MODE as it imports."""
    for name in [m for m in sys.modules if m.startswith("habana_frameworks")]:
        sys.modules.pop(name)
    import habana_frameworks.torch as htorch

    htorch.core.reset()
    htorch.hpu.reset()
    htorch.hpex.kernels.reset()
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
    htorch.unregister()
    for name in [m for m in sys.modules if m.startswith("habana_frameworks")]:
        sys.modules.pop(name)

    accel.get("cpu")


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


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """`--device cuda` (`accel.get("cuda")`) builds the CUDA backend's CPU double (`tests/fakes/cuda_on_cpu.py`);
    yields its class. The CPU backend is current again afterwards."""
    import torch
    from fakes.cuda_on_cpu import CudaOnCpu

    real = accel._backend_class
    monkeypatch.setattr(accel, "_backend_class", lambda name: CudaOnCpu if name == "cuda" else real(name))
    torch._dynamo.reset()  # the double's compiles are counted from none
    yield CudaOnCpu
    torch._dynamo.reset()
    accel.get("cpu")
