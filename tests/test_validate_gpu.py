"""example_scripts/validate_gpu.sh in its CPU form (--tiny): every row of the NVIDIA validation runs end
to end here with tiny shapes, so that the script a GPU machine runs is the one the suite checked; its
install row with a stand-in interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT

SCRIPT = ROOT / "example_scripts" / "validate_gpu.sh"
ROWS = (
    "torch sees the cpu device",
    "bf16 supported",
    "free memory >= 1 GiB",
    "DeepSpeed imports, accelerator cpu",
    "e2e three steps, tiny, cpu",
    "generation: HF generate vs the hybrid engine",
    "generation: the engine in device graphs",
    "random tiny-shape actor and critic",
    "step 3: PPO steps, engine + device graphs",
    "step 3 used torch's fused AdamW (no op build)",
    "decode step captured whole (no eager fallback)",
)


def run(*args: str) -> subprocess.CompletedProcess:
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars} | {"PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_validate_gpu_cpu_form_passes_every_row(tmp_path):
    result = run("--tiny", "--output", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = {
        m[1].strip(): (m[2], int(m[3]))
        for m in re.finditer(r"^\| (.+?) \| (PASS|FAIL) \| +(\d+) \|", result.stdout, re.M)
    }
    assert list(table) == list(ROWS), result.stdout
    assert all(status == "PASS" for status, _ in table.values()), result.stdout
    assert "validation passed" in result.stdout
    assert "| engine |" in result.stdout and "| hf |" in result.stdout  # the benchmark's figures follow the table
    assert (tmp_path / "generation.json").exists() and (tmp_path / "ppo" / "rlhf" / "actor").is_dir()


def test_validate_gpu_refuses_an_unknown_option(tmp_path):
    result = run("--bogus", "--output", str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: unknown option --bogus")


def test_validate_gpu_installs_with_the_machines_torch_pinned(tmp_path):
    """The install row (issue #28 item 9: nothing may replace the machine's torch): requirements-cuda.txt with
    the installed torch as a constraint, so pip fails rather than replace it. A stand-in interpreter answers
    the machine probe as an H100 would, records `pip`, and fails every run after the install (fast)."""
    calls = tmp_path / "pip_calls.txt"
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  "-m pip "*) echo "$*" >>"{calls}"; exit 0 ;;\n'
        "  *\"accel.get('cuda')\"*) printf 'device: stand-in\\nbf16: yes\\nfree GiB: 79.0\\n'; exit 0 ;;\n"
        f'  *"torch.__version__"*) exec "{sys.executable}" "$@" ;;\n'
        "esac\n"
        "exit 1\n"
    )
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(
        ["bash", str(SCRIPT), "--output", str(tmp_path / "out")],
        cwd=ROOT,
        env=env | {"PYTHON": str(python)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert re.search(r"^\| install requirements-cuda.txt \(torch pinned\) +\| PASS", result.stdout, re.M), (
        result.stdout + result.stderr
    )
    installs = [line.split() for line in calls.read_text().splitlines() if line.startswith("-m pip install")]
    assert len(installs) == 1 and "-c" in installs[0], installs
    assert installs[0][installs[0].index("-r") + 1] == str(ROOT / "requirements-cuda.txt")
    constraints = Path(installs[0][installs[0].index("-c") + 1]).read_text().split()
    assert constraints == [f"torch=={torch.__version__}"]
    assert result.returncode == 1  # the runs after the install failed on the stand-in, as they should
