"""The output head over a slice of positions on frozen weights (an inference copy, a frozen reference,
LoRA's frozen base): torch's matmul broadcasts a weight that needs no grad over a 3-D input it cannot view
as 2-D, copying the vocabulary matrix once per row. The prefill and the answer log-probs hand the head a
contiguous input, so it is one matmul; the values are unchanged."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile
from transformers import AutoModelForCausalLM, StaticCache

from dschat_hal.models.tiny import tiny_config
from dschat_hal.rlhf.generation.decode import last_logits
from dschat_hal.rlhf.trainer import answer_logprobs

VOCAB, BATCH, PROMPT, ANSWER = 96, 3, 7, 4


def frozen_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family, VOCAB)).eval().requires_grad_(False)


def broadcast_head_shapes(model: torch.nn.Module, fn) -> list[list[int]]:
    """Input shapes of ops that saw the head's weight broadcast to [batch, hidden, vocab]."""
    hidden = model.get_output_embeddings().weight.shape[1]
    with profile(record_shapes=True) as prof:
        fn()
    return [shape for event in prof.events() for shape in event.input_shapes if shape == [BATCH, hidden, VOCAB]]


@pytest.mark.parametrize("family", ["opt", "llama", "bloom"])
def test_the_prefill_head_is_one_matmul_on_frozen_weights(family):
    model = frozen_model(family)
    ids = torch.randint(3, VOCAB, (BATCH, PROMPT))
    mask = torch.ones(BATCH, PROMPT + ANSWER, dtype=torch.long)
    positions = torch.arange(PROMPT).expand(BATCH, -1)

    def prefill():
        cache = StaticCache(config=model.config, max_batch_size=BATCH, max_cache_len=PROMPT + ANSWER)
        return last_logits(model, ids, mask, positions, cache, torch.arange(PROMPT))

    with torch.no_grad():
        assert broadcast_head_shapes(model, prefill) == []
        expected = model(ids, attention_mask=mask[:, :PROMPT]).logits[:, -1]
        torch.testing.assert_close(prefill(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_answer_logprobs_head_is_one_matmul_on_frozen_weights(family):
    model = frozen_model(family)
    seq = torch.randint(3, VOCAB, (BATCH, PROMPT + ANSWER))
    mask = torch.ones_like(seq)
    start = PROMPT - 1
    with torch.no_grad():
        assert broadcast_head_shapes(model, lambda: answer_logprobs(model, model, seq, mask, start)) == []
        got = answer_logprobs(model, model, seq, mask, start)
        logits = model(seq, attention_mask=mask).logits.float()
        expected = torch.log_softmax(logits[:, start:-1], -1).gather(-1, seq[:, start + 1 :, None])[..., 0]
        torch.testing.assert_close(got[:, start:], expected, rtol=1e-5, atol=1e-5)
        assert not got[:, :start].any()
