"""kill -9 during saves (steps 1 and 3), then --resume: the loss curve and the final weights equal the
uninterrupted run's, and no partial directory is ever presented as a checkpoint or an output.

Kills land at named moments of a save (`DSCHAT_HAL_KILL_AT`, a SIGKILL the process sends itself)
and, for step 1, also at random times. The killed runs are real processes; resumes run in-process.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script, save_tiny_rlhf_models
from safetensors.torch import load_file

from training.step1_supervised_finetuning.main import main as step1
from training.step3_rlhf_finetuning.main import main as step3

STEP1 = "training/step1_supervised_finetuning/main.py"
STEP3 = "training/step3_rlhf_finetuning/main.py"
# Runs argv[1] as __main__ with SIGINT raising KeyboardInterrupt, whatever disposition was inherited.
WITH_DEFAULT_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = sys.argv[1:]; sys.path[0] = __import__('os').path.dirname(sys.argv[0]); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def step1_args(tmp: Path) -> list[str]:
    return ["--device", "cpu", "--data_output_path", str(tmp / "cache"), "--max_seq_len", "64", "--seed", "4",
            "--learning_rate", "2e-3", "--print_loss", "--save_interval", "1"]  # fmt: skip


def weights_equal(a: Path, b: Path) -> bool:
    left, right = load_file(a), load_file(b)
    return left.keys() == right.keys() and all(torch.allclose(left[k], right[k], atol=1e-6) for k in left)


def assert_nothing_partial(checkpoints: Path, output: Path) -> int:
    """Every published unit is complete, `latest` names one; the output is absent or complete.
    Returns the step `latest` names (0: none)."""
    if output.exists():
        assert (output / "training_summary.json").exists() or (output / "config.json").exists(), output
    if not checkpoints.exists():
        return 0
    for unit in checkpoints.glob("global_step*"):
        assert (unit / "manifest.json").exists(), f"incomplete unit presented: {unit}"
    latest = checkpoints / "latest"
    if not latest.exists():
        return 0
    tag = latest.read_text().strip()
    assert (checkpoints / tag / "manifest.json").exists()
    return int(tag.removeprefix("global_step"))


@pytest.fixture(scope="module")
def step1_reference(tmp_path_factory) -> tuple[list[float], Path]:
    tmp = tmp_path_factory.mktemp("ref1")
    result = step1([*step1_args(tmp), "--output_dir", str(tmp / "full")])
    return result["losses"], tmp / "full" / "model.safetensors"


@pytest.mark.parametrize(
    "kill_at",
    [
        "checkpoint_engine_saved:3",  # engine files of step 3 written, no manifest yet
        "checkpoint_before_latest:5",  # step 5 published, `latest` still names step 4
        "publish:1",  # every checkpoint done, the final model not yet renamed into place
    ],
)
def test_step1_killed_while_saving_resumes_exactly(kill_at, step1_reference, tmp_path):
    losses, final = step1_reference
    args, out = step1_args(tmp_path), tmp_path / "run"
    killed = run_script(STEP1, *args, "--output_dir", str(out), env={"DSCHAT_HAL_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()  # the final save never completed, so there is no output at all
    done = assert_nothing_partial(tmp_path / "run_checkpoints", out)
    resumed = step1([*args, "--output_dir", str(out), "--resume"])["losses"]
    assert resumed == pytest.approx(losses[done:], abs=1e-5)
    assert weights_equal(final, out / "model.safetensors")
    assert not list(tmp_path.glob(".*.tmp-*")) and not list((tmp_path / "run_checkpoints").glob(".*"))


def test_step1_killed_at_random_times_resumes_exactly(step1_reference, tmp_path):
    losses, final = step1_reference
    args, out, rng = step1_args(tmp_path), tmp_path / "run", random.Random(7)
    for _ in range(2):
        child = subprocess.Popen(
            [sys.executable, STEP1, *args, "--output_dir", str(out), "--resume"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        for line in child.stdout:
            if "perplexity before training" in line:
                break
        time.sleep(rng.uniform(0.0, 0.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert_nothing_partial(tmp_path / "run_checkpoints", out)
    done = assert_nothing_partial(tmp_path / "run_checkpoints", out)
    resumed = step1([*args, "--output_dir", str(out), "--resume"])["losses"]
    assert resumed == pytest.approx(losses[done:], abs=1e-5)
    assert weights_equal(final, out / "model.safetensors")


@pytest.fixture(scope="module")
def step3_models(tmp_path_factory) -> Path:
    """A tiny actor and reward model saved as steps 1 and 2 would (random weights, no training)."""
    return save_tiny_rlhf_models(tmp_path_factory.mktemp("models3"))


def step3_args(models: Path, tmp: Path) -> list[str]:
    return ["--device", "cpu", "--data_output_path", str(tmp / "cache"), "--seed", "9",
            "--actor_model_name_or_path", str(models / "actor"), "--critic_model_name_or_path", str(models / "reward"),
            "--max_prompt_seq_len", "48", "--max_answer_seq_len", "8", "--per_device_generation_batch_size", "4",
            "--per_device_training_batch_size", "4", "--enable_test_mode", "--test_stop_step", "3",
            "--save_interval", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def step3_reference(step3_models, tmp_path_factory) -> tuple[list[dict], Path]:
    tmp = tmp_path_factory.mktemp("ref3")
    return step3([*step3_args(step3_models, tmp), "--output_dir", str(tmp / "full")])["history"], tmp / "full"


@pytest.mark.parametrize(
    "kill_at",
    [
        "checkpoint_engine_saved:3",  # step 2's actor saved, its critic not: the torn case of the issue
        "step3_actor_written:1",  # final save: the actor written, the critic not yet
    ],
)
def test_step3_killed_while_saving_resumes_exactly(kill_at, step3_models, step3_reference, tmp_path):
    args = step3_args(step3_models, tmp_path)
    full, reference = step3_reference
    out = tmp_path / "run"
    killed = run_script(STEP3, *args, "--output_dir", str(out), env={"DSCHAT_HAL_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()  # neither a new actor beside an old critic nor half an output
    done = assert_nothing_partial(tmp_path / "run_checkpoints", out)
    manifest = json.loads((tmp_path / "run_checkpoints" / f"global_step{done}" / "manifest.json").read_text())
    assert manifest["engines"] == ["actor", "critic"]
    resumed = step3([*args, "--output_dir", str(out), "--resume"])["history"]
    assert len(resumed) == len(full) - done
    for key in ("reward", "actor_loss", "critic_loss"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in full[done:]], abs=1e-4), key
    for model in ("actor", "critic"):
        assert weights_equal(reference / model / "model.safetensors", out / model / "model.safetensors")


def test_ctrl_c_exits_130_with_one_line_and_checkpoints_intact(tmp_path):
    # A shell without job control starts background jobs with SIGINT ignored, and children inherit
    # that: the child gives itself Python's usual Ctrl-C handler, as a terminal's Ctrl-C finds it. Done
    # in the child, not with `preexec_fn`, which makes subprocess fork() this large pytest process
    # (ENOMEM under memory pressure); without it the child starts by vfork/posix_spawn.
    argv = [STEP1, *step1_args(tmp_path), "--output_dir", str(tmp_path / "run"), "--num_train_epochs", "50"]
    child = subprocess.Popen(
        [sys.executable, "-c", WITH_DEFAULT_CTRL_C, *argv],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen = []
    for line in child.stdout:
        seen.append(line)
        if "step 3/" in line:
            break
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, "".join(seen)[-3000:] + out[-1000:] + err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)") and "Traceback" not in err
    assert assert_nothing_partial(tmp_path / "run_checkpoints", tmp_path / "run") >= 2
