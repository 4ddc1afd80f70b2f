"""The hybrid engine's memory estimate counts the inference copy and the KV cache, chooses gathering all
at once or by layer groups from both, and refuses before generating when neither fits."""

from __future__ import annotations

import pytest
import torch
from test_hybrid_engine import CONFIGS, EOS, PAD, engine_for, peaked_model, prompt_batch
from transformers import StaticCache

from dschat_hal.errors import UserError
from dschat_hal.rlhf.generation.decode import cache_tensors
from dschat_hal.rlhf.generation.engine import HybridEngine
from dschat_hal.rlhf.generation.sampling import GenerationConfig
from dschat_hal.rlhf.memory import PhaseMemory, kv_cache_bytes


@pytest.mark.parametrize("family", list(CONFIGS))
def test_kv_cache_estimate_is_the_static_cache_transformers_allocates(family):
    config = CONFIGS[family]()
    if family == "llama":
        config.num_key_value_heads = 2  # grouped-query attention: the cache holds the KV heads only
    cache = StaticCache(config=config, max_batch_size=3, max_cache_len=17, device="cpu", dtype=torch.bfloat16)
    allocated = sum(t.numel() * t.element_size() for t in cache_tensors(cache))
    assert kv_cache_bytes(config, 3, 17, torch.bfloat16) == allocated > 0


def test_the_kv_cache_decides_between_all_at_once_and_groups():
    needs = PhaseMemory(copy=100, gathered=100, group=30, kv_cache=150, shape=(16, 512))
    assert needs.all_at_once() == 250 and needs.grouped() == 250  # the cache outweighs the gathered weights
    assert needs.group_layers(1000, 8, zero3=True) == 0
    assert needs.group_layers(300, 8, zero3=True) == 8  # the copy alone (2 x 100) would have fitted at once
    assert needs.group_layers(None, 8, zero3=True) == 0  # unknown free memory: never refused
    with pytest.raises(UserError):
        needs.group_layers(249, 8, zero3=True)


def hybrid_engine(stage: int, answer: int = 100) -> tuple[HybridEngine, object]:
    model = peaked_model("llama", lora=True)
    config = GenerationConfig(max_answer_seq_len=answer, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)
    backend, engine = engine_for(model, stage)
    return HybridEngine(engine, backend, config, dtype=torch.float32, gather_group_layers=1), backend


def test_zero3_gathers_by_groups_when_the_kv_cache_would_not_fit_beside_everything(monkeypatch):
    hybrid, backend = hybrid_engine(3)
    prompts, mask = prompt_batch()  # 3 x 9, answers up to 100: a cache larger than the model
    needs = hybrid.phase_memory(3, 9 + 100)
    assert needs.kv_cache == kv_cache_bytes(hybrid.actor.module.config, 3, 109, torch.float32) > needs.gathered
    free = int(needs.grouped() / 0.9)
    assert 2 * hybrid.copy.full_bytes() < 0.8 * free  # the old estimate (copy only) gathered all at once here
    monkeypatch.setattr(backend, "available_memory", lambda: free)
    hybrid.generate(prompts, mask)
    assert hybrid.copy.gather_calls == 3  # layer 0, layer 1, the rest
    assert hybrid.phase_memory(3, 109) == PhaseMemory(0, needs.gathered, needs.group, 0, (3, 109))  # both kept


@pytest.mark.parametrize("stage", [3, 2], ids=["zero3", "zero2"])
def test_refused_before_generating_when_nothing_fits(monkeypatch, stage):
    hybrid, backend = hybrid_engine(stage)
    prompts, mask = prompt_batch()
    needs = hybrid.phase_memory(3, 9 + 100)
    monkeypatch.setattr(backend, "available_memory", lambda: needs.grouped() - 1)
    with pytest.raises(UserError) as refused:
        hybrid.generate(prompts, mask)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("hybrid engine: generation needs ")
    kv = kv_cache_bytes(hybrid.actor.module.config, 3, 109, torch.float32)
    assert f"KV cache {kv / 2**20:.2f} MB for 3 rows x 109 positions" in message and "MB is free" in message
    assert "--per_device_generation_batch_size" in message and "--inference_tp_size" in message
    if stage == 3:
        assert "inference copy" in message and "--offload_reference_model" in message
        assert hybrid.copy.model is None and hybrid.copy.gather_calls == 0  # nothing gathered or allocated
    assert hybrid._cache is None


def test_cpu_ranks_on_one_host_share_its_free_memory(monkeypatch):
    """Two local ranks (torchrun's LOCAL_WORLD_SIZE) share the host: each gets half of what is free."""
    from dschat_hal.rlhf.memory import _mb

    hybrid, backend = hybrid_engine(3)
    prompts, mask = prompt_batch()
    needs = hybrid.phase_memory(3, 9 + 100)
    free = int(1.5 * needs.grouped())  # enough for one rank, not for two
    monkeypatch.setattr(backend, "available_memory", lambda: free)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert hybrid._free_memory() == free
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert hybrid._free_memory() == free // 2
    with pytest.raises(UserError, match=f"but {_mb(free // 2)} is free"):
        hybrid.generate(prompts, mask)
