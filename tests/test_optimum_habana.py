"""The HPU paths against the REAL optimum-habana (requirements-hpu-test.txt) on CPU tensors, with only
`habana_frameworks` replaced by the stand-in in `tests/fakes`.

`adapt_transformers_to_gaudi()` patches a whole process for good, so each test runs the patched side
in a child process (`run_real_gaudi`); references come from plain transformers in this process, which
never imports optimum-habana. Weights travel through a file, so both sides compute on the same ones.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, real_gaudi_env, run_real_gaudi
from test_hybrid_engine import EOS, PAD, answers_equal, peaked_model, prompt_batch, reference_tokens

from dschat_hal.rlhf.generation.sampling import GenerationConfig

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
from conftest import train_engine
from test_gaudi_paths import GREEDY
from test_hybrid_engine import peaked_model, prompt_batch
from dschat_hal.rlhf.generation.engine import HybridEngine
from dschat_hal.rlhf.generation.hf_generate import PlainGenerator
weights = torch.load(sys.argv[1])
out = {}
for family, stages in json.loads(sys.argv[2]).items():
    prompts, mask = prompt_batch()
    result = out[family] = {}
    for stage in stages:
        model = peaked_model(family, lora=True)
        model.load_state_dict(weights[family])
        result["class"] = type(model).__name__
        engine = train_engine(backend, model, stage)
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


def test_validate_gaudi_installs_with_dependencies_and_keeps_the_images_stack(tmp_path):
    """The install row (issue #28 item 3): requirements-hpu.txt WITH its dependencies (optimum-habana imports
    optimum, sentence-transformers, scikit-learn and sentencepiece; `--no-deps` lost them), the image's
    torch, habana and DeepSpeed distributions, as `pip list` names them, pinned as constraints. `pip` is
    recorded by a stand-in interpreter; everything else runs on this one (optimum-habana left out: faster)."""
    tools, calls = tmp_path / "bin", tmp_path / "pip_calls.txt"
    tools.mkdir()
    (tools / "hl-smi").write_text("#!/bin/sh\necho 'stand-in hl-smi'\n")
    image = ["torch==2.6.0+hpu.synapse.v1.21.0", "habana-torch-plugin==1.21.0.555", "deepspeed==0.16.1+hpu.synapse"]
    freeze = "\\n".join([*image, "numpy==1.26.4", "torchmetrics==1.7.0"])
    (tools / "python").write_text(
        f'#!/bin/sh\nif [ "$1 $2" = "-m pip" ]; then\n  echo "$*" >>"{calls}"\n'
        f'  [ "$3" = list ] && printf "{freeze}\\n"\n  exit 0\nfi\nexec "{sys.executable}" "$@"\n'
    )
    for tool in tools.iterdir():
        tool.chmod(0o755)
    env = real_gaudi_env({"PYTHON": str(tools / "python")}, optimum_habana=False)
    env["PATH"] = os.pathsep.join([str(tools), env["PATH"]])
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(ROOT / "example_scripts" / "validate_gaudi.sh"), "--checks-only", "--output", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert re.search(r"^\| install requirements-hpu.txt +\| PASS", result.stdout, re.M), result.stdout + result.stderr
    installs = [line.split() for line in calls.read_text().splitlines() if line.startswith("-m pip install")]
    assert len(installs) == 1 and "--no-deps" not in installs[0] and "-c" in installs[0], installs
    assert installs[0][installs[0].index("-r") + 1] == str(ROOT / "requirements-hpu.txt")
    constraints = installs[0][installs[0].index("-c") + 1]
    assert open(constraints).read().split() == image  # the image's stack only: pip fails rather than replace it


# In the child: step-3 generation on optimum-habana's patched classes, HPU graphs as step 3's flags decide
# (`runtime.generation_graphs`, as `start_backend` sets it), by the hybrid engine or the plain path: four generation phases over two
# shape buckets (9 and 12 prompt positions; a 2-row batch, which the hybrid engine pads to 3 rows), a
# training step between phases; the weights each phase generated with are saved for the parent's references.
GRAPHS = """
import deepspeed, logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from conftest import train_engine
from test_gaudi_paths import GREEDY
from test_hybrid_engine import PAD, peaked_model, prompt_batch
from dschat_hal.args import step3_parser
from dschat_hal.rlhf.generation.engine import HybridEngine
from dschat_hal.rlhf.generation.hf_generate import PlainGenerator
from dschat_hal.configs import HardwareConfig, to_config
from dschat_hal.runtime import generation_graphs
weights = torch.load(sys.argv[1])
prompts, mask = prompt_batch()
wide = (torch.nn.functional.pad(prompts, (3, 0), value=PAD), torch.nn.functional.pad(mask, (3, 0)))
phases = [(prompts, mask), wide, (prompts[:2], mask[:2]), wide]
out = {}
for flags, runs in json.loads(sys.argv[2]).items():
    args = step3_parser().parse_args(["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", *flags.split()])
    backend.use_graphs = generation_graphs(backend, to_config(args, HardwareConfig), args.enable_device_graphs)
    for family, generators in runs.items():
      for name in generators:
        kind, stage = name.split("_zero")
        model = peaked_model(family, lora=True)
        model.load_state_dict(weights[family])
        engine = train_engine(backend, model, int(stage))
        generator = HybridEngine(engine, backend, GREEDY, dtype=torch.float32) if kind == "hybrid" else PlainGenerator(engine, backend, GREEDY)
        ht.hpu.reset()
        result = out[f"{flags} {family} {name}"] = {"phases": [], "use_graphs": backend.use_graphs}
        for phase, (p, m) in enumerate(phases):
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
            path = sys.argv[3] + f"/{flags}_{family}_{name}_{phase}.pt"
            torch.save(state, path)
            seq = generator.generate(p, m)
            result["phases"].append({"tokens": seq.tolist(), "weights": path, "captures": ht.hpu.captures(), "replays": ht.hpu.replays()})
            # a training step through the actor's own forward (never a graph's)
            loss = engine(input_ids=seq[:, -8:], attention_mask=torch.ones_like(seq[:, -8:]), use_cache=False).logits.float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        result["forward_restored"] = "forward" not in engine.module.__dict__
        result["graph_calls_outside_generation"] = [r for r in ht.hpu.graph_replays if r["grad_enabled"] or r["training"]]
        result["kinds"] = sorted({r["kind"] for r in ht.hpu.graph_replays})
        result["counted"] = [dict(backend.graph_counts), {"captures": ht.hpu.captures(), "replays": ht.hpu.replays()}]
        backend.graph_counts.update(captures=0, replays=0)
print(json.dumps(out))
"""

# step 3's flags -> {family: generators}; no flag: HPU graphs by default in lazy mode
GRAPH_RUNS = {
    "": {
        "opt": ["hybrid_zero0", "hybrid_zero3", "plain_zero0"],
        "bloom": ["hybrid_zero3", "plain_zero0"],
        "llama": ["hybrid_zero0", "plain_zero0"],
    },
    "--disable_hpu_graphs": {"opt": ["hybrid_zero0", "plain_zero0"]},
}


def test_hpu_graphs_capture_optimum_habanas_generation_once_per_shape(tmp_path):
    """Step-3 generation on optimum-habana's patched OPT, BLOOM and Llama (which decode in their own
    `generate`) runs in HPU graphs by default in lazy mode, with no `--enable_hpu_graphs`: by the hybrid
    engine (ZeRO 0 and 3) and by the plain path (ZeRO 0), one HPU graph per shape bucket, replayed by
    later phases across training steps, training forwards outside any graph, and the tokens of plain
    transformers on the weights of each phase (greedy, fp32, LoRA). `--disable_hpu_graphs`: no graph."""
    weights = {family: peaked_model(family, lora=True).state_dict() for family in GRAPH_RUNS[""]}
    path = tmp_path / "weights.pt"
    torch.save(weights, path)
    out = run_real_gaudi(CHILD_PRELUDE + GRAPHS, str(path), json.dumps(GRAPH_RUNS), str(tmp_path))
    prompts, mask = prompt_batch()
    wide = (torch.nn.functional.pad(prompts, (3, 0), value=PAD), torch.nn.functional.pad(mask, (3, 0)))
    phases = [(prompts, mask), wide, (prompts[:2], mask[:2]), wide]
    for flags, runs in GRAPH_RUNS.items():
        for family, generators in runs.items():
            for name in generators:
                where = (flags, family, name)
                result = out[f"{flags} {family} {name}"]
                counts = [(phase["captures"], phase["replays"]) for phase in result["phases"]]
                assert result["use_graphs"] == (flags == ""), where
                if flags:
                    assert counts == [(0, 0)] * len(phases) and result["kinds"] == [], (where, counts)
                else:
                    # a capture for each new bucket (the prompt's forward bypasses the graph), replays afterwards;
                    # the plain path pads no rows: the 2-row batch is a shape of its own
                    buckets = [1, 2, 2, 2] if name.startswith("hybrid") else [1, 2, 3, 3]
                    assert [c for c, _ in counts] == buckets, (where, counts)
                    assert all(later[1] > earlier[1] for earlier, later in zip(counts, counts[1:], strict=False))
                    assert result["kinds"] == ["bypass", "capture", "replay"], where
                assert result["graph_calls_outside_generation"] == [] and result["forward_restored"], where
                assert result["counted"][0] == result["counted"][1], where  # the backend counts as the bridge
                seen = []
                for phase, (p, m) in zip(result["phases"], phases, strict=True):
                    model = peaked_model(family, lora=True)
                    model.load_state_dict(torch.load(phase["weights"]))
                    seen.append(model.state_dict())
                    seq = torch.tensor(phase["tokens"])
                    assert seq.shape == (p.size(0), p.size(1) + GREEDY.max_answer_seq_len), where
                    reference = reference_tokens(model, p, m, GREEDY)
                    assert answers_equal(seq, reference), (where, seq, reference)
                assert any(not torch.equal(seen[0][k], seen[-1][k]) for k in seen[0])  # the steps changed weights
    assert "generation forward captured in HPU graphs" in out["stderr"]


@pytest.mark.parametrize("lazy", ["1", "0"], ids=["lazy", "eager"])
def test_e2e_step3_on_gaudi_generates_in_hpu_graphs(e2e_output, tmp_path, lazy):
    """e2e's step 3 with `--device hpu --enable-hybrid-engine` and `--enable_hpu_graphs`, with the real
    optimum-habana: its patched actor decodes in its own `generate`, in HPU graphs in lazy mode (the
    default); eager mode (`PT_HPU_LAZY_MODE=0`, models under torch.compile) runs end to end without them."""
    for name in ("actor", "reward"):
        (tmp_path / name).symlink_to(e2e_output / name)
    args = ["--step", "3", "--device", "hpu", "--enable-hybrid-engine", "--output-dir", str(tmp_path)]
    args += ["--step3-args", "--enable_test_mode --test_stop_step 2 --enable_hpu_graphs"]
    result = subprocess.run(
        [sys.executable, "training/e2e_rlhf.py", *args],
        cwd=ROOT,
        env=real_gaudi_env({"PT_HPU_LAZY_MODE": lazy}),
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "optimum-habana 1.21.2" in output and "falling back to HF generate: GaudiOPTForCausalLM" in output
    assert re.search(r"\| 3 \| \d+ \| held-out reward", result.stdout)
    counts = re.search(r"generation HPU graphs: (\d+) captured, (\d+) replays", output)
    if lazy == "1":
        assert "GaudiOPTForCausalLM's generation forward captured in HPU graphs" in output
        assert counts and int(counts[1]) == 1 and int(counts[2]) > 0, output[-3000:]  # one shape bucket, replayed
    else:
        assert "eager mode: torch.compile(backend='hpu_backend')" in output
        assert "HPU graphs need lazy mode (PT_HPU_LAZY_MODE=1)" in output
        assert counts and counts.groups() == ("0", "0"), output[-3000:]


def test_validate_gaudi_tiny_benchmarks_generation_in_hpu_graphs(tmp_path):
    """`validate_gaudi.sh --tiny` on the bridge stand-in with the real optimum-habana: the checks, the
    generation benchmark (HF, the engine, the engine in HPU graphs) at a tiny bloom shape, and a row with
    the graphs captured and replayed, all passing; the benchmark's table follows the pass/fail table."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "hl-smi").write_text("#!/bin/sh\necho 'stand-in hl-smi'\n")
    (tools / "hl-smi").chmod(0o755)
    env = real_gaudi_env({"PYTHON": sys.executable})
    env["PATH"] = os.pathsep.join([str(tools), env["PATH"]])
    script = ROOT / "example_scripts" / "validate_gaudi.sh"
    result = subprocess.run(
        ["bash", str(script), "--tiny", "--output", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0 and "validation passed" in result.stdout, result.stdout + result.stderr
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in result.stdout.splitlines()
        if "| PASS" in line
    }
    assert "optimum-habana (1.21.2) loads" in rows
    assert {"generation: HF vs the hybrid engine", "generation: the engine in HPU graphs"} <= set(rows)
    graphs = next(name for name in rows if name.startswith("HPU graphs:"))
    captured, replays = map(int, re.findall(r"\d+", graphs))
    assert captured == 1 and replays > captured  # one shape, replayed by every later token and phase
    modes = [line.split("|")[2].strip() for line in result.stdout.splitlines() if re.match(r"\| 2 \| ", line)]
    assert modes == ["hf", "engine", "engine"]  # the benchmark's rows: with and without the engine and graphs
    assert "| 2 | engine |" in result.stdout and "| yes |" in result.stdout  # the engine's tokens equal HF's
