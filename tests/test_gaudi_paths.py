"""Gaudi specifics proven on the CPU with the stand-in of habana_frameworks: lazy/eager fixed at import,
one graph per decode step, optimizer parity, and HPU-graph replay aliasing (the real optimum-habana's
part: tests/test_optimum_habana.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAKES, ROOT, train_engine
from test_hybrid_engine import EOS, PAD, peaked_model, prompt_batch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import OPTForCausalLM

import accel
from dschat_hal.rlhf.generation.decode import last_logits
from dschat_hal.rlhf.generation.engine import HybridEngine
from dschat_hal.rlhf.generation.sampling import GenerationConfig
from dschat_hal.runtime import ADAM_EPS

GREEDY = GenerationConfig(max_answer_seq_len=12, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)


# ---- lazy or eager: fixed when the bridge is imported -------------------------------------------------
PROBE = (
    "import json, accel, habana_frameworks.torch as h, torch\n"
    "b = accel.get('hpu'); b.use_graphs = True\n"
    "step = torch.nn.Linear(1, 1)\n"
    "print(json.dumps({'import_env': h.IMPORT_ENV, 'runtime_lazy': h.internal.is_lazy(), "
    "'backend_lazy': b.lazy_mode, 'captured': b.capture_decode_step(step) is step and bool(h.hpu.graph_wrapped)}))"
)


def probe(env: dict, prelude: str = "") -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PT_HPU_") and k != "ACCEL_DEVICE"}
    full |= {"PYTHONPATH": f"{ROOT}{os.pathsep}{FAKES}"} | env
    result = subprocess.run(
        [sys.executable, "-c", prelude + PROBE], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_lazy_mode_is_set_before_the_bridge_imports_and_read_back_from_it():
    lazy = probe({})
    assert lazy == {"import_env": "1", "runtime_lazy": True, "backend_lazy": True, "captured": True}
    eager = probe({"PT_HPU_LAZY_MODE": "0"})  # the user's choice wins; no HPU graphs in eager mode
    assert eager == {"import_env": "0", "runtime_lazy": False, "backend_lazy": False, "captured": False}
    # a bridge imported before accel (variable unset) stays in its mode: the backend believes the runtime
    early = probe({}, prelude="import habana_frameworks.torch\n")
    assert early["import_env"] is None and early["runtime_lazy"] is False and early["backend_lazy"] is False
    assert early["captured"] is False


TORCH_IMPORT_ENV = """
import os, sys
seen = []
sys.addaudithook(lambda event, args: event == "import" and args[0] == "torch" and seen.append(os.environ.get("PT_HPU_LAZY_MODE")))
sys.argv = ["main.py", "--device", "hpu"]
import {module}
print(seen[0])
"""


@pytest.mark.parametrize(
    "step", ["step1_supervised_finetuning", "step2_reward_model_finetuning", "step3_rlhf_finetuning"]
)
def test_each_step_sets_the_hpu_defaults_before_torch_is_imported(step):
    """torch may autoload Habana's bridge, which fixes its mode then: the default must already be set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PT_HPU_") and k != "ACCEL_DEVICE"}
    code = TORCH_IMPORT_ENV.format(module=f"training.{step}.main")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "1"


def test_hpu_defaults_are_not_set_for_other_devices():
    from accel._hpu_env import may_use_hpu

    assert may_use_hpu(["main.py", "--device", "hpu"], {})
    assert may_use_hpu(["main.py"], {"ACCEL_DEVICE": "hpu"})
    assert not may_use_hpu(["main.py", "--device=cpu"], {})
    assert not may_use_hpu(["main.py", "--device", "cuda"], {})


# ---- one graph per decode step ---------------------------------------------------------------------------
class OpRecorder(TorchDispatchMode):
    """Every aten op with its non-tensor arguments (tensors by shape and dtype), split at each decode step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[list[tuple]] = [[]]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        def describe(value):
            if isinstance(value, torch.Tensor):
                return ("tensor", tuple(value.shape), value.dtype)
            if isinstance(value, (list, tuple)):
                return tuple(describe(v) for v in value)
            return repr(value)

        self.steps[-1].append((str(func), describe(args), describe(sorted((kwargs or {}).items()))))
        return func(*args, **(kwargs or {}))


def test_every_decode_step_runs_the_same_ops_with_the_same_arguments():
    backend = accel.get("cpu")
    model = peaked_model("opt", lora=False)
    engine = train_engine(backend, model)
    config = GenerationConfig(max_answer_seq_len=8, pad_token_id=PAD, eos_token_id=None, do_sample=False)
    hybrid = HybridEngine(engine, backend, config, dtype=torch.float32)
    prompts, mask = prompt_batch()
    recorder = OpRecorder()
    original_mark_step = backend.mark_step
    backend.mark_step = lambda: recorder.steps.append([])  # a lazy-mode graph ends at each mark_step
    try:
        with recorder:
            hybrid.generate(prompts, mask)
    finally:
        backend.mark_step = original_mark_step
    full_steps = recorder.steps[2:-2]  # after prefill, before the last (shorter) step and the phase's end
    assert len(full_steps) >= 5
    assert all(step == full_steps[0] for step in full_steps), "a decode step's ops depend on its position"


def test_prefill_head_on_the_last_position_matches_subclasses():
    class GaudiOPTForCausalLM(OPTForCausalLM):  # optimum-habana's classes subclass transformers'
        pass

    model = peaked_model("opt", lora=False).eval()
    gaudi = GaudiOPTForCausalLM(model.config).eval()
    gaudi.load_state_dict(model.state_dict())
    head_inputs = []
    gaudi.get_output_embeddings().register_forward_hook(lambda m, args, out: head_inputs.append(args[0].shape))
    prompts, mask = prompt_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = last_logits(gaudi, prompts, mask, positions, None, torch.arange(9))
        full = model(input_ids=prompts, attention_mask=mask).logits[:, -1]
    assert head_inputs == [torch.Size([3, 1, 32])]  # the head ran on the last position only (kept 3-D for AutoTP)
    assert torch.allclose(logits, full, atol=1e-5)


# ---- optimizer parity ------------------------------------------------------------------------------------
def test_the_same_flags_make_the_same_adamw_on_every_device(fake_hpu):
    settings = {}
    for name in ("cpu", "hpu"):
        engine = train_engine(accel.get(name), peaked_model("opt", lora=False), weight_decay=0.1)
        groups = engine.optimizer.param_groups
        settings[name] = [(g["eps"], tuple(g["betas"]), g["weight_decay"]) for g in groups]
    assert fake_hpu.hpex.optimizers.instances  # the hpu engine trained with (fake) FusedAdamW
    assert settings["hpu"] == settings["cpu"]
    assert {s[0] for s in settings["hpu"]} == {ADAM_EPS} and {s[2] for s in settings["hpu"]} == {0.1, 0.0}


# ---- HPU-graph replays alias their outputs ----------------------------------------------------------------
def test_the_graph_double_returns_the_same_outputs_and_copies_inputs(fake_hpu):
    backend = accel.get("hpu")
    backend.use_graphs = True
    step = backend.capture_decode_step(torch.nn.Linear(2, 2))
    first_input = torch.ones(1, 2)
    with torch.no_grad():
        first = step(first_input)
        kept = first.clone()
        second = step(torch.full((1, 2), 3.0))
    assert second is first  # one static output tensor, overwritten by the replay
    assert not torch.equal(first, kept)  # what was held from the first step changed under the holder
    assert torch.equal(first_input, torch.ones(1, 2))  # the caller's input was copied, never written


def test_the_engine_never_reads_logits_of_a_replayed_step(fake_hpu):
    """With the aliasing double, captured decoding gives the same tokens as uncaptured decoding."""
    backend = accel.get("hpu")
    model = peaked_model("opt", lora=True)
    prompts, mask = prompt_batch()
    engine = train_engine(backend, model)
    plain = HybridEngine(engine, backend, GREEDY, dtype=torch.float32).generate(prompts, mask)
    backend.use_graphs = True
    captured = HybridEngine(engine, backend, GREEDY, dtype=torch.float32)
    first, again = captured.generate(prompts, mask), captured.generate(prompts, mask)
    assert sum(r["replay"] for r in fake_hpu.hpu.graph_replays) > 10
    assert torch.equal(first, plain) and torch.equal(again, plain)
