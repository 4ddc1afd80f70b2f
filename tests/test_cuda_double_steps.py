"""Step 3 with `--device cuda` on the CUDA backend's CPU double (`tests/fakes/cuda_on_cpu.py`: the real
`CudaAccelerator`, only what needs a GPU replaced): PPO and critic-free GRPO train with the CUDA backend's
optimizer, and the hybrid engine's decode step goes through its CUDA-graph capture, which is replayed; the
answers and statistics are the CPU backend's, to the bit (fp32, same seed, same host)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_rlhf_models
from test_critic_free import ESTIMATORS, argv

import accel
from accel.cpu import FusedAdamW
from accel.cuda import CAPTURE_CALLS
from dschat_hal.rlhf.generation.engine import HybridEngine
from training.step3_rlhf_finetuning.main import main as step3

STEPS = 2  # PPO steps in each run below
# each run's flags and its --max_steps (optimizer steps) for STEPS PPO steps: GRPO (N = 2) steps twice a PPO step
RUNS = {
    "ppo": (["--advantage_estimator", "gae"], STEPS),
    "grpo": (ESTIMATORS["grpo"], 2 * STEPS),
}
STATS = ("reward", "actor_loss", "critic_loss", "kl", "advantage")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return save_tiny_rlhf_models(tmp_path_factory.mktemp("cuda_double_models"))


def recorded_run(models: Path, tmp_path: Path, estimator: str, device: str) -> tuple[dict, list, list]:
    """Step 3 on `device` with the hybrid engine's decode step captured (`--enable_device_graphs`); the
    summary, the sequences the hybrid engine generated, and the fused AdamW of each optimizer step."""
    flags, max_steps = RUNS[estimator]
    answers, stepped = [], []
    generate, optimizer_step = HybridEngine.generate, FusedAdamW.step

    def record_generate(self, prompts, mask):
        answers.append(generate(self, prompts, mask))
        return answers[-1]

    def record_step(self, *args, **kwargs):
        stepped.append(self)
        return optimizer_step(self, *args, **kwargs)

    torch._dynamo.reset()  # each run captures from none
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HybridEngine, "generate", record_generate)
        patch.setattr(FusedAdamW, "step", record_step)
        run_flags = [*flags, "--device", device, "--enable_hybrid_engine", "--enable_device_graphs"]
        run_flags += ["--save_interval", "0", "--max_steps", str(max_steps), "--output_dir", ""]
        run = step3(argv(models, tmp_path / device, *run_flags))
    return run, answers, stepped


@pytest.mark.parametrize("estimator", list(RUNS))
def test_step3_trains_on_the_cuda_backend_double(estimator, models, tmp_path, cuda_on_cpu, capsys, caplog):
    with caplog.at_level(logging.INFO):
        run, answers, stepped = recorded_run(models, tmp_path, estimator, "cuda")
    backend = accel.current()
    assert isinstance(backend, cuda_on_cpu) and backend.name == "cuda"
    history, optimizer_steps = run["history"], run["optimizer_steps"]
    assert len(history) == STEPS and len(answers) == STEPS
    assert all(math.isfinite(record[key]) for record in history for key in STATS if key in record)
    trained = ["actor"] if estimator == "grpo" else ["actor", "critic"]
    assert sorted(optimizer_steps) == sorted(["planned", *trained])  # GRPO: no critic
    assert all(("critic_loss" in record) == (estimator == "ppo") for record in history)
    # the CUDA backend's optimizer, said at start-up and stepping every trained model
    assert "\noptimizer: torch.optim.AdamW(fused=True)\n" in capsys.readouterr().out
    assert len(stepped) == sum(optimizer_steps[name] for name in trained) > 0
    assert all(optimizer.defaults["fused"] is True for optimizer in stepped)
    # the decode step captured by the CUDA path: one whole graph (static shapes: one capture), replayed past
    # the calls that may still fall back, no fallback
    assert len(backend.compile_calls) == backend.compiler.frame_count == 1
    call = backend.compile_calls[0]
    assert call["fullgraph"] is True and call["dynamic"] is False and call["options"]["triton.cudagraphs"] is True
    assert backend.replays >= STEPS * CAPTURE_CALLS
    assert backend.graphs_fallback_reason == "" and "decodes eager" not in caplog.text

    # the same run on the CPU backend (its own capture, torch's fused AdamW): the same answers and statistics
    cpu_run, cpu_answers, _ = recorded_run(models, tmp_path, estimator, "cpu")
    assert accel.current().name == "cpu"
    assert all(torch.equal(a, b) for a, b in zip(answers, cpu_answers, strict=True))
    for key in STATS:
        assert [r.get(key) for r in history] == [r.get(key) for r in cpu_run["history"]], key
    assert cpu_run["optimizer_steps"] == optimizer_steps


def test_a_decode_step_that_does_not_capture_decodes_eager_in_step3(models, tmp_path, cuda_on_cpu, caplog):
    """A capture that fails on its first call (as a dynamo or CUDA-graph error would): step 3 goes on eager,
    said in one line, and makes no further capture."""

    def failing_compile(self, step, **kwargs):
        self.compile_calls.append(kwargs)

        def capture(*args):
            raise RuntimeError("capture failed\nsecond line")

        return capture

    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.INFO):
        patch.setattr(cuda_on_cpu, "graph_compile", failing_compile)
        run, answers, _ = recorded_run(models, tmp_path, "grpo", "cuda")
    backend = accel.current()
    assert len(run["history"]) == STEPS and all(math.isfinite(r["actor_loss"]) for r in run["history"])
    assert len(answers) == STEPS and len(backend.compile_calls) == 1
    assert backend.graphs_fallback_reason == "RuntimeError: capture failed - second line"
    lines = [r.getMessage() for r in caplog.records if "decodes eager" in r.getMessage()]
    assert lines == [
        f"accel/cuda: the decode step does not capture as one CUDA graph ({backend.graphs_fallback_reason}); it decodes eager"
    ]
