"""The HPU paths against the REAL optimum-habana (requirements-hpu-test.txt) on CPU tensors, with only
`habana_frameworks` replaced by the stand-in in `tests/fakes`.

`adapt_transformers_to_gaudi()` patches a whole process for good, so each test runs the patched side
in a child process (`run_real_gaudi`); references come from plain transformers in this process, which
never imports optimum-habana. Weights travel through a file, so both sides compute on the same ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, real_gaudi_env, run_real_gaudi
from test_hybrid_engine import EOS, PAD, answers_equal, peaked_model, prompt_batch, reference_tokens

from dschat_hal.rlhf.generation import GenerationConfig

GREEDY = GenerationConfig(max_answer_seq_len=12, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)

CHILD_PRELUDE = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import torch
import accel
backend = accel.get("hpu")
import habana_frameworks.torch as ht
"""

# In the child: the hybrid engine on optimum-habana's patched class under ZeRO 0 and 3, and the plain
# generation path (`generate` with the backend's arguments), from the weights the parent saved.
GENERATE = """
from test_gaudi_paths import GREEDY, engine_on
from test_hybrid_engine import peaked_model, prompt_batch
from dschat_hal.rlhf.generation import HybridEngine, PlainGenerator
weights = torch.load(sys.argv[1])
out = {}
for family, stages in json.loads(sys.argv[2]).items():
    prompts, mask = prompt_batch()
    result = out[family] = {}
    for stage in stages:
        model = peaked_model(family, lora=True)
        model.load_state_dict(weights[family])
        result["class"] = type(model).__name__
        engine = engine_on(backend, model, stage)
        ht.core.reset()
        result[f"hybrid_zero{stage}"] = HybridEngine(engine, backend, GREEDY, dtype=torch.float32).generate(prompts, mask).tolist()
        result[f"mark_steps_zero{stage}"] = len(ht.core.calls)
        result[f"plain_zero{stage}"] = PlainGenerator(engine, backend, GREEDY).generate(prompts, mask).tolist()
print(json.dumps(out))
"""


def generate_in_child(tmp_path, stages: dict[str, list[int]]) -> tuple[dict, dict]:
    """Tokens from the patched child, and plain transformers' on the same weights here."""
    weights, references = {}, {}
    prompts, mask = prompt_batch()
    for family in stages:
        model = peaked_model(family, lora=True)
        weights[family] = model.state_dict()
        references[family] = reference_tokens(model, prompts, mask, GREEDY)
    path = tmp_path / "weights.pt"
    torch.save(weights, path)
    return run_real_gaudi(CHILD_PRELUDE + GENERATE, str(path), json.dumps(stages)), references


def test_real_optimum_habana_generates_the_tokens_of_plain_transformers(tmp_path):
    """Llama and BLOOM through optimum-habana's patched classes, OPT included: its decode positions
    (`token_idx + offset` in optimum-habana 1.21) are transformers' again (`accel/hpu.py`)."""
    out, references = generate_in_child(tmp_path, {"llama": [0, 3], "bloom": [0], "opt": [0, 3]})
    assert {family: out[family]["class"] for family in references} == {
        "llama": "GaudiLlamaForCausalLM",
        "bloom": "GaudiBloomForCausalLM",
        "opt": "GaudiOPTForCausalLM",
    }
    for family, result in out.items():
        if family == "stderr":
            continue
        for key in [k for k in result if k.startswith(("hybrid_", "plain_"))]:
            seq = torch.tensor(result[key])
            assert seq.shape == (3, 9 + GREEDY.max_answer_seq_len), (family, key)
            assert answers_equal(seq, references[family]), (family, key, seq, references[family])
        # optimum-habana's generate was told lazy_mode: it marks a step per token
        assert result["mark_steps_zero0"] > GREEDY.max_answer_seq_len


CHECKPOINTING = """
import transformers.modeling_utils
from optimum.habana.transformers import gradient_checkpointing
print(json.dumps({"torch": torch.utils.checkpoint.checkpoint is gradient_checkpointing.checkpoint,
                  "transformers": transformers.modeling_utils.checkpoint is gradient_checkpointing.checkpoint}))
"""


@pytest.mark.parametrize("lazy", ["1", "0"], ids=["lazy", "eager"])
def test_lazy_mode_checkpointing_is_optimum_habanas(lazy):
    """In lazy mode torch's and transformers' `checkpoint` names point at optimum-habana's function
    (as its trainer does); in eager mode they stay torch's."""
    out = run_real_gaudi(CHILD_PRELUDE + CHECKPOINTING, env={"PT_HPU_LAZY_MODE": lazy})
    assert out["torch"] is out["transformers"] is (lazy == "1")


STARTUP = """
import json, logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
import accel
backend = accel.get("hpu")
print(json.dumps({"gaudi_generate": backend.gaudi_generate, "notes": backend.runtime_notes()}))
"""


def test_a_working_optimum_habana_is_named_in_the_start_up_line():
    out = run_real_gaudi(STARTUP)
    assert out["gaudi_generate"] and out["notes"] == "optimum-habana 1.21.2"
    assert "WITHOUT optimum-habana" not in out["stderr"]


def test_a_missing_or_broken_optimum_habana_is_one_loud_line(tmp_path):
    """Never a silent fallback: absent (ImportError), or broken as optimum-habana breaks when `pip list`
    shows no habana-torch-plugin (IndexError from its version check)."""
    missing = run_real_gaudi(STARTUP, optimum_habana=False)
    silent_pip = tmp_path / "bin"
    silent_pip.mkdir()
    (silent_pip / "pip").write_text("#!/bin/sh\nexit 0\n")
    (silent_pip / "pip").chmod(0o755)
    env = {"PATH": os.pathsep.join([str(silent_pip), os.environ["PATH"]])}
    broken = run_real_gaudi(STARTUP, env=env)
    for out, problem in (
        (missing, "ModuleNotFoundError: No module named 'optimum'"),
        (broken, "IndexError: list index out of range"),
    ):
        lines = [line for line in out["stderr"].splitlines() if "WITHOUT optimum-habana" in line]
        assert len(lines) == 1 and f"WITHOUT optimum-habana ({problem})" in lines[0], out["stderr"][-2000:]
        assert "requirements-hpu.txt" in lines[0]
        assert not out["gaudi_generate"] and out["notes"] == f"WITHOUT optimum-habana ({problem})"


@pytest.mark.parametrize("installed", [True, False], ids=["installed", "missing"])
def test_validate_gaudi_has_a_row_for_optimum_habana(tmp_path, installed):
    """On the bridge stand-in (with an `hl-smi` that answers), the image checks pass; the optimum-habana
    row passes with its version, or fails the validation when the package is missing."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "hl-smi").write_text("#!/bin/sh\necho 'stand-in hl-smi'\n")
    (tools / "hl-smi").chmod(0o755)
    env = real_gaudi_env({"PYTHON": sys.executable}, optimum_habana=installed)
    env["PATH"] = os.pathsep.join([str(tools), env["PATH"]])
    script = ROOT / "example_scripts" / "validate_gaudi.sh"
    args = ["--skip-install", "--checks-only", "--output", str(tmp_path / "out")]
    result = subprocess.run(
        ["bash", str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    rows = [line for line in result.stdout.splitlines() if line.startswith("| optimum-habana")]
    assert len(rows) == 1, result.stdout + result.stderr
    if installed:
        assert result.returncode == 0 and "| optimum-habana (1.21.2) loads" in rows[0] and "| PASS" in rows[0]
        assert "validation passed" in result.stdout
    else:
        assert result.returncode == 1 and "(missing)" in rows[0] and "| FAIL" in rows[0]
        assert "validation FAILED (1 checks)" in result.stdout
