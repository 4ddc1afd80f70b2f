"""The README's demo: all three steps from one command, a loadable actor, chat (README in sync with CI: test_readme.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script, tiny_step3_argv
from transformers import AutoModelForCausalLM, AutoTokenizer

from dschat_hal.models import is_reward_checkpoint


def test_demo_produces_an_actor_that_transformers_loads_and_generates_from(e2e_output):
    stdout = (e2e_output / "e2e_stdout.txt").read_text()
    # held-out reward before and after step 3 (not two different training batches)
    assert re.search(r"\| 3 \| \d+ \| held-out reward -?[\d.]+ -> -?[\d.]+ \(before -> after 20 PPO steps\)", stdout)
    summary = json.loads((e2e_output / "rlhf" / "training_summary.json").read_text())
    assert [e["step"] for e in summary["evaluations"]] == [0, 20]
    for output in ("actor", "rlhf/actor"):
        generates_with_plain_transformers(e2e_output / output)
    assert AutoTokenizer.from_pretrained(e2e_output / "reward").model_input_names == ["input_ids", "attention_mask"]
    assert is_reward_checkpoint(e2e_output / "reward")  # a one-label sequence classifier (test_portable_outputs)


def generates_with_plain_transformers(model_dir) -> None:
    """The usual call on a saved model and tokenizer, exactly as a transformers user writes it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer("Human: How do I bake bread? Assistant:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_llama_saves_a_tokenizer_its_model_accepts(tmp_path):
    """OPT: the demo's outputs above; bloom: the two-process run below; llama here."""
    out = tmp_path / "llama"
    step1 = "--max_steps 1 --num_train_epochs 1 --data_split 1,0,0"
    result = run_script(
        "training/e2e_rlhf.py",
        "--step",
        "1",
        "--actor-model",
        "tiny-llama",
        "--output-dir",
        str(out),
        "--step1-args",
        step1,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    generates_with_plain_transformers(out / "actor")


def test_e2e_step3_alone_needs_steps_1_and_2(tmp_path):
    result = run_script("training/e2e_rlhf.py", "--step", "3", "--output-dir", str(tmp_path / "none"))
    assert result.returncode == 2
    assert "step 3 needs" in result.stderr and "run steps 1 and 2 first" in result.stderr


def test_chat_answers_each_turn(e2e_output):
    result = run_script(
        "training/chat.py",
        "--path",
        str(e2e_output / "rlhf" / "actor"),
        "--device",
        "cpu",
        "--max_new_tokens",
        "8",
        "--greedy",
        stdin="How do I bake bread?\nAnd then?\nquit\n",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("Assistant:") == 2


@pytest.mark.parametrize("device", ["cpu", "hpu"])
def test_e2e_step3_with_the_hybrid_engine(e2e_output, tmp_path, device):
    """e2e's step 3 with --enable-hybrid-engine on the CPU and on the fake HPU (with HPU graphs)."""
    for name in ("actor", "reward"):
        (tmp_path / name).symlink_to(e2e_output / name)
    step3_args = "--enable_test_mode --test_stop_step 2" + (" --enable_hpu_graphs" if device == "hpu" else "")
    fakes = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'fakes'}"} if device == "hpu" else {}
    result = run_script(
        "training/e2e_rlhf.py",
        "--step",
        "3",
        "--device",
        device,
        "--enable-hybrid-engine",
        "--output-dir",
        str(tmp_path),
        "--step3-args",
        step3_args,
        env=fakes,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "--enable_hybrid_engine" in result.stdout
    assert re.search(r"\| 3 \| \d+ \| held-out reward", result.stdout)
    if device == "hpu":
        assert "decode step captured in an HPU graph" in result.stdout + result.stderr


def test_single_node_launches_deepspeed_through_this_interpreter_with_two_processes(tmp_path):
    """No `deepspeed` on PATH: e2e runs DeepSpeed's launcher with its own interpreter (2 CPU ranks);
    the bloom actor it saves generates with plain transformers."""
    import sys

    env = {"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"}  # the venv's bin/ is not on PATH
    assert not any((Path(d) / "deepspeed").exists() for d in env["PATH"].split(":"))
    out = tmp_path / "out"
    result = run_script(
        "training/e2e_rlhf.py",
        "--step",
        "1",
        "--deployment-type",
        "single_node",
        "--num-devices",
        "2",
        "--actor-model",
        "tiny-bloom",
        "--output-dir",
        str(out),
        "--step1-args",
        "--max_steps 1 --num_train_epochs 1 --data_split 1,0,0",
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{sys.executable} -m deepspeed.launcher.runner --num_gpus 2" in result.stdout
    assert "dist_world_size=2" in result.stdout + result.stderr
    assert "reduce_scatter_tensor" not in result.stderr
    generates_with_plain_transformers(out / "actor")


def test_step3_bf16_zero3_critic_from_a_saved_reward_model(e2e_output, tmp_path):
    """A step-2 checkpoint loaded under ZeRO-3 in bf16 gets a bf16 value head (one dtype for ZeRO-3)."""

    argv = [*tiny_step3_argv(e2e_output, tmp_path, answer=4), "--dtype", "bf16", "--actor_zero_stage", "3"]
    argv += ["--critic_zero_stage", "3", "--enable_test_mode", "--test_stop_step", "1"]
    result = run_script("training/step3_rlhf_finetuning/main.py", *argv, "--output_dir", str(tmp_path / "rlhf"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "in bfloat16 (--dtype bf16)" in result.stdout


def test_known_third_party_deprecations_are_silenced_once_at_start_up():
    import warnings

    import torch.distributed as dist

    from dschat_hal.runtime import silence_known_warnings

    def deprecations(silence: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            if silence:
                silence_known_warnings()
            for collective in (dist.reduce_scatter_tensor, dist.all_gather_into_tensor):
                try:
                    collective(None, None)  # warns on entry, then fails: no process group
                except Exception:
                    pass
        return [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]

    assert len(deprecations(silence=False)) == 2  # torch still warns: the filter has something to do
    assert deprecations(silence=True) == []


def test_start_up_skips_what_costs_seconds_and_is_never_used():
    """DeepSpeed's Muon module is importable for its isinstance checks without loading inductor, and
    the objects alive after start-up are out of the cyclic collector's scans (DeepSpeed collects often)."""
    probe = (
        "import gc, sys, deepspeed\n"
        "from dschat_hal import runtime\n"
        "runtime._import_muon_uncompiled()\n"
        "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam\n"
        "runtime.freeze_startup_objects()\n"
        "print('inductor' if 'torch._inductor.compile_fx' in sys.modules else 'no inductor', gc.get_freeze_count() > 100000)\n"
    )
    result = run_script("-c", probe)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["no", "inductor", "True"]
