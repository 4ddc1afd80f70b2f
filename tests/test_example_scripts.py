"""Every example script runs with --tiny (bundled tiny model, CPU), in step order per family."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from transformers import AutoModelForCausalLM

SCRIPTS = {
    "bloom": ["step1_bloom_1b1.sh", "step2_bloom_560m.sh", "step3_bloom_1b1_560m.sh"],
    "llama2": ["step1_llama2_7b.sh", "step2_llama2_7b.sh", "step3_llama2_7b_lora.sh"],
}


def run(script, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env["PYTHON"] = sys.executable
    return subprocess.run(
        ["bash", str(ROOT / "example_scripts" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("family", sorted(SCRIPTS))
def test_family_scripts_run_tiny(family, tmp_path):
    for script in SCRIPTS[family]:
        result = run(f"{family}/{script}", "--tiny", "--device", "hpu", "--output", str(tmp_path))
        assert result.returncode == 0, script + result.stdout[-2000:] + result.stderr[-3000:]
    actor = AutoModelForCausalLM.from_pretrained(tmp_path / "rlhf" / "actor")
    assert actor.config.model_type == ("bloom" if family == "bloom" else "llama")


def test_scripts_reject_an_unknown_device(tmp_path):
    result = run("bloom/step1_bloom_1b1.sh", "--device", "tpu", "--tiny", "--output", str(tmp_path))
    assert result.returncode == 2 and "--device must be hpu or cuda" in result.stderr


def test_validate_gaudi_reports_a_non_gaudi_machine(tmp_path):
    result = run("validate_gaudi.sh", "--skip-install", "--output", str(tmp_path))
    assert result.returncode == 1
    assert "| habana_frameworks importable" in result.stdout and "FAIL" in result.stdout
    assert "validation FAILED" in result.stdout
    assert "not a working Gaudi image" in result.stderr


def clean_clone(tmp_path, venv: bool = True):
    """A checkout as the README's setup leaves it: the project beside `.venv/bin/python` (this
    interpreter, through a wrapper), nothing activated."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("example_scripts", "training", "dschat_hal", "accel"):
        (clone / name).symlink_to(ROOT / name)
    if venv:
        (clone / ".venv" / "bin").mkdir(parents=True)
        python = clone / ".venv" / "bin" / "python"
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        python.chmod(0o755)
    return clone


def without_the_venv(extra: dict | None = None) -> dict:
    """The environment of a shell where the venv was never activated: its bin not on PATH, no $PYTHON."""
    venv_bin = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env.pop("PYTHON", None)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    return env | (extra or {})


def git_clone_of_head(tmp_path) -> tuple[Path, str]:
    """`git clone` of this checkout's HEAD commit (committed files only, as a user gets them) and the commit."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    clone = tmp_path / "clone"
    for command in (
        ["git", "clone", "-q", "--shared", "--no-checkout", str(ROOT), str(clone)],
        ["git", "-C", str(clone), "fetch", "-q", str(ROOT), "HEAD"],
        ["git", "-C", str(clone), "checkout", "-q", "--detach", "FETCH_HEAD"],
    ):
        subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    return clone, commit.stdout.strip()


def test_a_script_runs_as_the_readme_writes_it_in_a_clean_clone(tmp_path):
    """A fresh `git clone`, its `.venv` as the README's setup leaves it (this interpreter's venv, linked
    in place of a second install), nothing activated, PATH and PYTHONPATH without the venv or the
    project, and the README's command: the script finds the venv's python, says so, and runs the
    clone's code: not the checkout the venv's editable install points at (which ran before). One
    script (the llama2 ones source the same common.sh; each run takes minutes on a loaded 2-core machine)."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs the project's virtual environment (the README's setup)")
    script = "bloom/step1_bloom_1b1.sh"
    clone, commit = git_clone_of_head(tmp_path)
    (clone / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    env = without_the_venv()
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        ["bash", f"example_scripts/{script}", "--tiny"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"python: {clone}/.venv/bin/python (the .venv beside the scripts)" in result.stderr.splitlines()
    actor = clone / "output" / script.split("/")[0] / "actor"
    made_by = json.loads((actor / "made_by.json").read_text())
    assert made_by["command"][0] == f"{clone}/.venv/bin/python"
    assert made_by["source"] == {"commit": commit, "modified": False}, made_by["source"]  # the clone's code ran


def sourced(clone, *args: str, env: dict) -> subprocess.CompletedProcess:
    """common.sh's choices for `args`: the interpreter line, then NUM_DEVICES and the step-1 accumulation."""
    code = 'FAMILY=bloom; source example_scripts/common.sh "$@"; echo "$NUM_DEVICES $(accumulation 128 8)"'
    return subprocess.run(
        ["bash", "-c", code, "common", *args], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )


def test_without_a_venv_the_scripts_use_python_then_path_and_say_so(tmp_path):
    clone = clean_clone(tmp_path, venv=False)
    chosen = sourced(clone, "--tiny", env=without_the_venv({"PYTHON": sys.executable}))
    assert f"python: {sys.executable} ($PYTHON)" in chosen.stderr
    fallback = sourced(clone, "--tiny", env=without_the_venv())
    assert fallback.returncode == 0 and "(python3 from PATH; no " in fallback.stderr


def test_without_num_devices_the_scripts_count_the_visible_devices(tmp_path):
    """Gradient accumulation follows the devices deepspeed will use (accel's count; the HPU stand-in
    shows one), not a guess of 8; a device that is absent is one error line."""
    from conftest import FAKES

    clone = clean_clone(tmp_path)
    fake_hpu = without_the_venv({"PYTHONPATH": os.pathsep.join([str(ROOT), str(FAKES)])})
    counted = sourced(clone, "--device", "hpu", "--output", str(tmp_path / "o"), env=fake_hpu)
    assert counted.returncode == 0, counted.stderr[-2000:]
    assert counted.stdout.split() == ["1", "16"]  # 128 = 16 x 8 x 1 device
    assert "devices: 1 hpu device(s) visible" in counted.stderr
    given = sourced(clone, "--device", "hpu", "--num-devices", "4", "--output", str(tmp_path / "o"), env=fake_hpu)
    assert given.stdout.split() == ["4", "4"]
    import accel

    if accel.detect() == "cuda":
        pytest.skip("CUDA devices are visible here: the refusal needs a machine without them")
    absent = sourced(clone, "--device", "cuda", "--output", str(tmp_path / "o"), env=without_the_venv())
    assert absent.returncode == 2 and absent.stdout == ""
    assert absent.stderr.splitlines()[-1].startswith("error: ") and "--num-devices N" in absent.stderr
