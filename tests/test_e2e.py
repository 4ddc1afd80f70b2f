"""The README's demo: all three steps from one command, a loadable actor, chat, and the README in sync with CI."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ROOT, run_script
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_demo_produces_an_actor_that_transformers_loads_and_generates_from(e2e_output):
    stdout = (e2e_output / "e2e_stdout.txt").read_text()
    assert re.search(r"\| 3 \| \d+ \| reward -?[\d.]+ \(first step\) -> -?[\d.]+ \(last step\)", stdout)
    actor_dir = e2e_output / "rlhf" / "actor"
    model = AutoModelForCausalLM.from_pretrained(actor_dir)
    tokenizer = AutoTokenizer.from_pretrained(actor_dir)
    ids = tokenizer("Human: How do I bake bread? Assistant:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert (e2e_output / "reward" / "value_head.safetensors").exists()


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


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    demo, tests = commands[0], commands[1]
    assert "e2e_rlhf.py" in demo and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("device", ["cpu", "hpu"])
def test_e2e_step3_with_the_hybrid_engine(e2e_output, tmp_path, device):
    """e2e's step 3 with --enable-hybrid-engine on the CPU and on the fake HPU (with HPU graphs)."""
    for name in ("actor", "reward"):
        (tmp_path / name).symlink_to(e2e_output / name)
    step3_args = "--enable_test_mode --test_stop_step 2" + (" --enable_hpu_graphs" if device == "hpu" else "")
    fakes = {"PYTHONPATH": str(ROOT / "tests" / "fakes")} if device == "hpu" else {}
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
    assert re.search(r"\| 3 \| \d+ \| reward", result.stdout)
    if device == "hpu":
        assert "decode step captured in an HPU graph" in result.stdout + result.stderr
