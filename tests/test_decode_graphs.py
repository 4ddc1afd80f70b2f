"""Device graphs in step 3: with the decode step captured, step 3's prompts come in a few fixed shapes, so
the capture is made once per shape bucket and never runs into torch.compile's recompile limit (after which
CUDA graphs are silently off). The CPU backend captures through torch.compile(fullgraph=True,
dynamic=False) with a counting backend: each compiled graph is counted."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from test_hybrid_engine import EOS, PAD, VOCAB, engine_for, peaked_model
from torch._dynamo.testing import CompileCounter

from dschat_hal.data import Collator
from dschat_hal.rlhf.generation.engine import HybridEngine
from dschat_hal.rlhf.generation.sampling import GenerationConfig
from dschat_hal.runtime import dataloader

MAX_PROMPT = 24


def prompt_rows(count: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Step-3 rows as the data cache holds them: unpadded prompt ids of lengths 3..MAX_PROMPT."""
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, MAX_PROMPT))]} for _ in range(count)]


def run_step3_generation(backend, actor, buckets, rows: int = 42, batch: int = 4) -> tuple[list, list]:
    """Step 3's data path (the real collator and loader) into the hybrid engine; the answers and batches."""
    backend.set_buckets(buckets)
    loader = dataloader(prompt_rows(rows), Collator(3, PAD, backend, MAX_PROMPT), batch, seed=0, shuffle=False)
    config = GenerationConfig(max_answer_seq_len=6, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)
    engine = HybridEngine(actor, backend, config, dtype=torch.float32)
    batches = list(loader)
    return [engine.generate(b["prompt"], b["prompt_att_mask"]) for b in batches], batches


@pytest.mark.parametrize("buckets", [None, [8, 16]], ids=["max_prompt_seq_len", "bucket_lengths"])
def test_decode_step_compiles_once_per_bucket(buckets, caplog):
    """On the actor's DeepSpeed engine (ZeRO-2, LoRA), as step 3 runs it: its hooks must not break the graph."""
    backend, actor = engine_for(peaked_model("opt", lora=True), 2)
    for _ in range(3):  # mid-run state: DeepSpeed's forward hooks now time every call (a graph break)
        ids = torch.randint(3, VOCAB, (3, 8))
        actor.backward(actor(input_ids=ids, labels=ids).loss)
        actor.step()
    torch._dynamo.reset()
    counter = CompileCounter()
    backend.graph_compiler, backend.use_graphs = counter, True
    try:
        with caplog.at_level(logging.INFO):
            answers, batches = run_step3_generation(backend, actor, buckets)
        lengths = {b["prompt"].size(1) for b in batches}
        assert len(batches) >= 10 and batches[-1]["prompt"].size(0) < batches[0]["prompt"].size(0)  # last one short
        allowed = len(buckets or []) + 1  # the buckets and --max_prompt_seq_len
        assert 1 <= counter.frame_count <= allowed, counter.frame_count
        assert lengths <= {*(buckets or []), MAX_PROMPT}
        assert "recompile_limit" not in caplog.text
        assert caplog.text.count("decode-step capture") == counter.frame_count  # logged once per capture
        backend.use_graphs = False
        caplog.clear()
        with caplog.at_level(logging.INFO):
            eager, eager_batches = run_step3_generation(
                backend, actor, None
            )  # uncompiled, each batch as long as it needs
        assert all(torch.equal(a[:, -6:], e[:, -6:]) for a, e in zip(answers, eager, strict=True))
        assert len({b["prompt"].size(1) for b in eager_batches}) > len(lengths)  # a new cache per new length ...
        assert caplog.text.count("static KV cache") == 1  # ... logged once (#19: a line per prompt length)
    finally:
        backend.use_graphs = False
        backend.graph_compiler = "eager"
        backend.set_buckets(None)
        torch._dynamo.reset()


def test_more_shapes_than_the_recompile_limit_are_named(monkeypatch, caplog):
    """Prompts that do not come through step 3's collator (nine lengths): said once, with the fix."""
    backend, actor = engine_for(peaked_model("opt", lora=False), 0)
    monkeypatch.setattr(backend, "use_graphs", True)
    monkeypatch.setattr(backend, "capture_decode_step", lambda step: step)  # shapes only: no compiler
    config = GenerationConfig(max_answer_seq_len=2, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)
    engine = HybridEngine(actor, backend, config, dtype=torch.float32)
    with caplog.at_level(logging.INFO):
        for length in range(3, 13):
            prompts = torch.randint(3, VOCAB, (2, length))
            engine.generate(prompts, torch.ones_like(prompts))
    assert caplog.text.count("decode-step capture") == 10
    assert caplog.text.count("9 decode shapes captured; torch.compile stops capturing past 8") == 1
    assert "--bucket_lengths" in caplog.text
