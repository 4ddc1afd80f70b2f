"""The hybrid engine: greedy tokens equal HF `generate` on the same weights for every family, ZeRO stage
and LoRA setting; seeded sampling reproduces; training weights come back exactly after generation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import train_engine
from transformers import AutoModelForCausalLM, BloomConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

import accel
from dschat_hal.models.lora import convert_to_lora, fuse_lora, lora_layers
from dschat_hal.rlhf.generation.engine import HybridEngine
from dschat_hal.rlhf.generation.hf_generate import PlainGenerator, hf_generate
from dschat_hal.rlhf.generation.sampling import GenerationConfig

VOCAB, PAD, EOS = 96, 0, 2
SPECIAL = {"pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": EOS}
CONFIGS = {
    "opt": lambda width=32: OPTConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        word_embed_proj_dim=width,
        ffn_dim=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        **SPECIAL,
    ),
    "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, **SPECIAL),
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        **SPECIAL,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        **SPECIAL,
    ),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **SPECIAL),
}
LORA_TARGET = {"opt": "layers.", "bloom": "h.", "llama": "layers.", "gpt_neox": "layers."}


def peaked_model(family: str, lora: bool, seed: int = 0, **size) -> torch.nn.Module:
    """A random model whose logits are peaked (greedy ties between kernels are then impossible), with
    LoRA factors that change the output when `lora`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](**size))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)
    if lora:
        convert_to_lora(model, LORA_TARGET[family], dim=4)
        for layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_left_weight, std=0.5)
    return model


def reference_tokens(model: torch.nn.Module, prompts, mask, config: GenerationConfig) -> torch.Tensor:
    """HF `generate` on a plain copy of the same weights (LoRA fused)."""
    plain = copy.deepcopy(model).eval()
    fuse_lora(plain)
    with torch.no_grad():
        return hf_generate(plain, prompts, mask, config)


def engine_for(model: torch.nn.Module, stage: int):
    backend = accel.get("cpu")
    return backend, train_engine(backend, model, stage)


def prompt_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, VOCAB, (3, 9), generator=generator)
    mask = torch.ones_like(prompts)
    for row, pad in enumerate((3, 0, 1)):
        prompts[row, :pad] = PAD
        mask[row, :pad] = 0
    return prompts, mask


def answers_equal(seq: torch.Tensor, reference: torch.Tensor) -> bool:
    """`seq` is padded to the full answer length; HF stops when every row has ended."""
    width = reference.size(1)
    return torch.equal(seq[:, :width], reference) and bool((seq[:, width:] == PAD).all())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("stage", [0, 2, 3], ids=["zero0", "zero2", "zero3"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_greedy_tokens_equal_hf_generate(family, stage, lora):
    if lora and family == "gpt2":
        pytest.skip("GPT-2 projections are Conv1D: LoRA adapts nn.Linear layers only (as upstream)")
    model = peaked_model(family, lora)
    prompts, mask = prompt_batch()
    config = GenerationConfig(max_answer_seq_len=12, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)
    reference = reference_tokens(model, prompts, mask, config)
    backend, engine = engine_for(model, stage)
    before = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    hybrid = HybridEngine(engine, backend, config, dtype=torch.float32)
    assert hybrid.fallback_reason is None
    seq = hybrid.generate(prompts, mask)
    assert seq.shape == (3, 9 + 12)
    assert answers_equal(seq, reference), (seq, reference)
    assert answers_equal(hybrid.generate(prompts, mask), reference)  # a second phase reuses cache and copy
    if stage == 3:
        assert hybrid.copy is not None and hybrid.copy.gather_calls == 2  # all at once, once per phase
        assert hybrid.copy.nbytes == hybrid.copy.full_bytes()  # no second copy of a tied head
    else:  # the training weights come back bit for bit after LoRA was folded in
        after = engine.module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert engine.module.training


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_seeded_sampling_reproduces_and_matches_hf(stage):
    model = peaked_model("opt", lora=True)
    with torch.no_grad():
        model.get_output_embeddings().weight.div_(8)  # flat enough for sampling to vary
    prompts, mask = prompt_batch(seed=3)
    config = GenerationConfig(max_answer_seq_len=10, pad_token_id=PAD, eos_token_id=EOS, temperature=0.9)
    torch.manual_seed(5)
    reference = reference_tokens(model, prompts, mask, config)
    backend, engine = engine_for(model, stage)
    hybrid = HybridEngine(engine, backend, config, dtype=torch.float32)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(hybrid.generate(prompts, mask))
    assert torch.equal(runs[0], runs[1])
    assert answers_equal(runs[0], reference)  # same RNG draws as HF's sampler
    torch.manual_seed(6)
    assert not torch.equal(hybrid.generate(prompts, mask), runs[0])


def test_grouped_gather_unpin_and_release_give_the_same_tokens(monkeypatch):
    model = peaked_model("llama", lora=True)
    prompts, mask = prompt_batch()
    config = GenerationConfig(max_answer_seq_len=8, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)
    reference = reference_tokens(model, prompts, mask, config)
    backend, engine = engine_for(model, 3)
    hybrid = HybridEngine(
        engine,
        backend,
        config,
        dtype=torch.float32,
        gather_group_layers=1,
        release_inference_cache=True,
        unpin_actor_parameters=True,
    )
    grouped = hybrid.phase_memory(3, 9 + 8).grouped()
    monkeypatch.setattr(backend, "available_memory", lambda: grouped + 1)  # not all at once: by layer groups
    assert answers_equal(hybrid.generate(prompts, mask), reference)
    assert hybrid.copy.gather_calls == 3  # layer 0, layer 1, and the rest (embeddings, norm, head)
    assert hybrid.copy.model is None and hybrid._cache is None  # both freed after the phase
    assert answers_equal(hybrid.generate(prompts, mask), reference)


def test_plain_generator_matches_too():
    model = peaked_model("bloom", lora=True)
    prompts, mask = prompt_batch()
    config = GenerationConfig(max_answer_seq_len=6, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)
    reference = reference_tokens(model, prompts, mask, config)
    backend, engine = engine_for(model, 2)
    assert answers_equal(PlainGenerator(engine, backend, config).generate(prompts, mask), reference)


def test_zero3_two_processes_gather_once_per_phase(tmp_path):
    """2 ranks, ZeRO-3 (really partitioned), LoRA, different prompts per rank: the hybrid engine's all-gathers
    per generation phase do not grow with the answer length (plain `generate`'s do), its tokens equal HF
    `generate`'s on the same weights, and training after generation changes the weights it generates with."""
    from conftest import run_script

    result = run_script(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "tests/workers/zero3_generation.py",
        str(tmp_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for path in (tmp_path / "rank0.json", tmp_path / "rank1.json"):
        rank = json.loads(path.read_text())
        assert rank["hybrid"]["4"] == rank["hybrid"]["16"] > 0
        assert rank["plain"]["16"] > rank["plain"]["4"] > 0  # ZeRO-3 hooks gather again for every token
        assert rank["tokens_equal_hf"] and rank["weights_changed"]


def test_a_family_the_loop_cannot_serve_falls_back_to_hf_generate(monkeypatch, caplog):
    from transformers import GPTNeoXForCausalLM

    monkeypatch.setattr(GPTNeoXForCausalLM, "_can_compile_fullgraph", False)
    model = peaked_model("gpt_neox", lora=False)
    prompts, mask = prompt_batch()
    config = GenerationConfig(max_answer_seq_len=6, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)
    reference = reference_tokens(model, prompts, mask, config)
    backend, engine = engine_for(model, 3)
    with caplog.at_level("INFO"):
        hybrid = HybridEngine(engine, backend, config, dtype=torch.float32)
    assert "falling back to HF generate: GPTNeoXForCausalLM has no static KV cache support" in caplog.text
    assert answers_equal(hybrid.generate(prompts, mask), reference)  # still from the gathered copy


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--inference_tp_size", "2"], "--inference_tp_size 2 must divide the number of ranks (1)"),
        (["--hybrid_engine", "deepspeed"], "--hybrid_engine deepspeed is not supported"),
        (["--tp_gather_partition_size", "0"], "--tp_gather_partition_size must be at least 1"),
    ],
)
def test_hybrid_engine_flags_it_cannot_honour_are_refused(e2e_output, tmp_path, capsys, flags, message):
    from conftest import tiny_step3_argv

    from training.step3_rlhf_finetuning.main import main as step3

    with pytest.raises(SystemExit) as exit_info:
        step3([*tiny_step3_argv(e2e_output, tmp_path), "--enable_hybrid_engine", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_generation_benchmark_prints_its_table(tmp_path):
    """The benchmark script runs end to end (tiny shape); its numbers are read in benchmarks/RESULTS.md."""
    from conftest import run_script

    out = tmp_path / "bench.json"
    result = run_script(
        "benchmarks/bench_generation.py",
        *("--model", "tiny", "--zero", "2", "3", "--prompt", "8", "--answer", "4", "--repeats", "1"),
        *("--json", str(out)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| ZeRO | mode | seconds |" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["zero"], r["mode"]) for r in rows] == [(z, m) for z in (2, 3) for m in ("hf", "hf_static", "engine")]
    assert all(r["seconds"] > 0 and r["floor_s"] > 0 for r in rows)
