"""Every example script runs with --tiny (bundled tiny model, CPU), in step order per family."""

from __future__ import annotations

import os
import subprocess
import sys

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
