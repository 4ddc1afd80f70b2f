"""Where step 3's frozen models live (one of the run's decisions, dschat_hal/decisions.py): the rule, the
memory plan that measures for it and counts it, and a two-process ZeRO-3 run whose replicated
reference/reward score as partitioned ones do."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from dschat_hal import memory_plan
from dschat_hal.args import step3_parser, validate_numbers
from dschat_hal.configs import Step3Config, to_config
from dschat_hal.errors import UserError

CONFIGS = ROOT / "benchmarks" / "model_configs"
GiB = 1024**3


def _flags(*flags: str, actor: str = "opt-1.3b", critic: str = "opt-350m"):
    argv = ["--actor_model_name_or_path", str(CONFIGS / actor), "--critic_model_name_or_path", str(CONFIGS / critic)]
    return step3_parser().parse_args([*argv, "--dtype", "fp16", *flags])


def _args(*flags: str, actor: str = "opt-1.3b", critic: str = "opt-350m") -> Step3Config:
    """Step 3's config of these flags, as the step builds it from its command line."""
    return to_config(_flags(*flags, actor=actor, critic=critic), Step3Config)


ZERO3 = ("--actor_zero_stage", "3", "--critic_zero_stage", "3")


def resolve_frozen_placement(args, device: str, ranks: int, memory: float | None) -> dict:
    """The frozen models' placement the run decides for this device, ranks and memory."""
    return memory_plan.decide_for(args, device, ranks, memory).placements


def _stages(placement) -> dict:
    return {name: (p.stage, p.offload) for name, p in placement.items()}


def test_below_zero3_the_frozen_models_are_replicated_as_upstream():
    args = _args("--actor_zero_stage", "2", "--critic_zero_stage", "2")
    placement = resolve_frozen_placement(args, "cuda", 8, 80 * GiB)
    assert _stages(placement) == {"reference": (0, False), "reward": (0, False)}
    assert "as upstream" in placement["reference"].reason


def test_zero3_models_that_fit_are_replicated():
    placement = resolve_frozen_placement(_args(*ZERO3), "cuda", 8, 80 * GiB)
    assert _stages(placement) == {"reference": (0, False), "reward": (0, False)}
    line = placement["reference"].describe("reference", 8)
    assert line.startswith("step 3: reference replicated on every rank (ZeRO-0: 2.45 GiB fits; no gathers")


def test_a_reference_too_big_to_replicate_is_partitioned_and_the_reward_still_replicated():
    # OPT-13B on 8x 40 GiB (DeepSpeed-Chat's setting): its 24 GiB reference does not fit replicated
    args = _args(*ZERO3, "--actor_lora_dim", "128", "--actor_gradient_checkpointing", "--actor_dropout", "0.0",
                 "--enable_hybrid_engine", "--inference_tp_size", "2", actor="opt-13b")  # fmt: skip
    placement = resolve_frozen_placement(args, "cuda", 8, 40 * GiB)
    assert _stages(placement) == {"reference": (3, False), "reward": (0, False)}
    assert "does not fit with it replicated" in placement["reference"].reason
    plan = memory_plan.build(args, 3, "cuda", 8, 40 * GiB)  # the plan counts what was placed
    parts = plan.phases[0].parts
    assert parts["reward"] == pytest.approx(2 * memory_plan.model_shape(str(CONFIGS / "opt-350m"), head=False).params)
    assert parts["reference"] == pytest.approx(2 * memory_plan.model_shape(str(CONFIGS / "opt-13b")).params / 8)
    assert plan.fits
    assert any(note.startswith("reference partitioned across 8 rank(s)") for note in plan.notes)


def test_too_big_for_the_memory_both_are_partitioned():
    placement = resolve_frozen_placement(_args(*ZERO3), "cuda", 8, 4 * GiB)
    assert _stages(placement) == {"reference": (3, False), "reward": (3, False)}
    assert "does not fit even partitioned" in placement["reward"].reason


def test_memory_unknown_keeps_upstreams_zero3():
    placement = resolve_frozen_placement(_args(*ZERO3), "cuda", 8, None)
    assert _stages(placement) == {"reference": (3, False), "reward": (3, False)}
    assert "unknown" in placement["reward"].reason


def test_offload_is_zero3_offload_even_below_zero3():
    args = _args("--actor_zero_stage", "2", "--critic_zero_stage", "3", "--offload_reference_model")
    placement = resolve_frozen_placement(args, "cuda", 8, 80 * GiB)
    assert _stages(placement) == {"reference": (3, True), "reward": (0, False)}
    assert "the actor is ZeRO-2" in placement["reference"].reason
    assert placement["reference"].describe("reference", 8).startswith("step 3: reference offloaded to host memory")
    plan = memory_plan.build(args, 3, "cuda", 8, 80 * GiB)
    assert plan.phases[0].parts["reference"] == 0 and plan.host > 0


def test_explicit_stages_are_honoured():
    args = _args(*ZERO3, "--reference_zero_stage", "3", "--reward_zero_stage", "0")
    assert _stages(resolve_frozen_placement(args, "cuda", 8, 80 * GiB)) == {
        "reference": (3, False),
        "reward": (0, False),
    }
    args = _args("--actor_zero_stage", "1", "--reward_zero_stage", "3")
    assert _stages(resolve_frozen_placement(args, "cuda", 8, None)) == {"reference": (0, False), "reward": (3, False)}


def test_zero0_with_offload_is_refused_in_one_line():
    args = _flags("--reward_zero_stage", "0", "--offload_reward_model")
    with pytest.raises(UserError, match="--offload_reward_model .* --reward_zero_stage 0") as err:
        validate_numbers(args)
    assert "\n" not in str(err.value)


def test_the_decisions_given_are_what_the_plan_counts():
    args = _args(*ZERO3)
    decisions = memory_plan.decide_for(args, "cuda", 8, None)
    assert decisions.reference.stage == 3
    plan = memory_plan.build(args, 3, "cuda", 8, 80 * GiB, decisions)  # more memory: the given decisions hold
    assert any(note.startswith("reference partitioned") for note in plan.notes)
    assert any(
        note.startswith("reference replicated") for note in memory_plan.build(args, 3, "cuda", 8, 80 * GiB).notes
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        decisions.reference = decisions.reward


def test_dry_run_shows_the_placement(capsys):
    from training.step3_rlhf_finetuning.main import main as step3

    step3(["--actor_model_name_or_path", "tiny-opt", "--critic_model_name_or_path", "tiny-opt", *ZERO3,
           "--device", "cpu", "--num_devices", "2", "--device_memory", "8GiB", "--dry_run"])  # fmt: skip
    out = capsys.readouterr().out
    assert "reference replicated on every rank (ZeRO-0:" in out and "reward replicated on every rank" in out


def _torchrun(tmp_path, name: str, port: str, *extra: str) -> tuple[list[dict], str]:
    out = tmp_path / name
    out.mkdir()
    cmd = [
        sys.executable,
        *("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port),
        str(ROOT / "tests/workers/frozen_placement.py"),
        str(out),
        *("--device", "cpu", "--dtype", "fp32", "--data_output_path", str(tmp_path / "cache")),
        *("--actor_model_name_or_path", "tiny-opt", "--critic_model_name_or_path", "tiny-opt", "--allow_random_critic"),
        *("--max_prompt_seq_len", "32", "--max_answer_seq_len", "8", "--num_warmup_steps", "0"),
        *("--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2", *ZERO3),
        *("--enable_test_mode", "--test_stop_step", "1", "--output_dir", "", *extra),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], result.stdout


def test_two_process_zero3_run_replicates_the_frozen_models_and_scores_as_partitioned(tmp_path):
    auto, auto_log = _torchrun(tmp_path, "auto", "29641")
    forced, forced_log = _torchrun(
        tmp_path, "zero3", "29642", "--reference_zero_stage", "3", "--reward_zero_stage", "3"
    )
    assert "step 3: reference replicated on every rank (ZeRO-0:" in auto_log
    assert "step 3: reward replicated on every rank (ZeRO-0:" in auto_log
    assert "step 3: reference partitioned across 2 rank(s) (ZeRO-3: --reference_zero_stage 3)" in forced_log
    for rank in range(2):
        assert auto[rank]["partitioned"] == {"actor": True, "ref": False, "critic": True, "reward": False}
        assert forced[rank]["partitioned"] == {"actor": True, "ref": True, "critic": True, "reward": True}
        for key, value in auto[rank]["first"].items():
            torch.testing.assert_close(torch.tensor(value), torch.tensor(forced[rank]["first"][key]), msg=key)


def test_an_explicit_replica_that_does_not_fit_gets_the_fix_of_partitioning_it():
    args = _args(*ZERO3, "--actor_lora_dim", "128", "--actor_gradient_checkpointing", "--actor_dropout", "0.0",
                 "--enable_hybrid_engine", "--inference_tp_size", "2", "--reference_zero_stage", "0",
                 actor="opt-13b")  # fmt: skip
    plan = memory_plan.build(args, 3, "cuda", 8, 40 * GiB)
    assert plan.fits is False
    assert memory_plan.find_fix(args, plan) == ["--reference_zero_stage 3"]


def test_the_dry_run_plans_what_the_run_decides():
    """The frozen models are placed first (the critic's graph not kept), then the critic's graph is kept
    where the plan still fits with it: planned alone (`--dry_run`, training/plan.py) as the run decides,
    even where keeping the graph would fit only with both frozen models partitioned."""
    from dschat_hal.decisions import Placement

    args = _args(*ZERO3)
    unknown = memory_plan.decide_for(args, "cuda", 8, None)
    assert unknown.critic_graph_kept

    def peak(reward_stage: int, kept: bool) -> float:
        trial = dataclasses.replace(
            unknown,
            reference=Placement(3, False, "trial"),
            reward=Placement(reward_stage, False, "trial"),
            old_values_from_training=unknown.old_values_from_training if kept else None,
        )
        return memory_plan.build(args, 3, "cuda", 8, None, trial).peak.total

    budget = (peak(3, kept=True) + peak(0, kept=True)) / 2  # the graph kept fits with both partitioned only
    flags = ("--device", "cuda", "--num_devices", "8", "--device_memory", f"{budget / memory_plan.FIT_FRACTION:.0f}B")
    args = _args(*ZERO3, *flags)
    decided = memory_plan.decide(args)
    assert _stages(decided.placements) == {"reference": (0, False), "reward": (0, False)}
    assert not decided.critic_graph_kept and decided.critic_graph_refused
    plan = memory_plan.plan_for(args, 3)
    assert plan.fits and any(note.startswith("reference replicated") for note in plan.notes)
    assert not any("kept through" in part for phase in plan.phases for part in phase.parts)
