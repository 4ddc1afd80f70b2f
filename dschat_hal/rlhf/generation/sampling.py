"""What to generate and how a token is picked: the generation config, HF `generate`'s sampling (fp32
scores, temperature, multinomial; no top-k/top-p) or greedy, the ids that end an answer, a sampled
token's log-prob, and the answers padded to their static length."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from accel import Accelerator


@dataclass
class GenerationConfig:
    """What to generate: answer length, sampling (temperature, no top-k/top-p) or greedy, special tokens."""

    max_answer_seq_len: int
    pad_token_id: int
    eos_token_id: int | list[int] | None  # any of these ends an answer (the model's generation_config may list several)
    do_sample: bool = True
    temperature: float = 1.0
    ignore_eos: bool = False  # always generate max_answer_seq_len tokens (benchmarks)
    # keep each sampled token's log-prob (fp32, one per token: `sampled_logprobs`) as `rollout_logprobs`
    return_logprobs: bool = False


def end_ids(config: GenerationConfig) -> list[int]:
    """The ids that end an answer (`eos_token_id` as a list)."""
    ids = config.eos_token_id
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


@functools.lru_cache(maxsize=8)
def _end_tensor(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def is_end(token: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Which rows' `token` ends an answer: any of the config's end ids (a device tensor made once)."""
    return (token[:, None] == _end_tensor(tuple(end_ids(config)), token.device)).any(-1)


def next_token(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Pick one token per row as HF `generate` does (fp32 scores, temperature, multinomial)."""
    scores = logits.float()
    if not config.do_sample:
        return scores.argmax(-1)
    probs = torch.softmax(scores / config.temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


def sampled_logprobs(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """log p(`token`) per row under `logits` (fp32, the policy's own distribution: no temperature, as
    the training forward scores it): the one number per row and step the engine keeps."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None]).squeeze(-1)


def pad_answers(seq: torch.Tensor, prompt_len: int, config: GenerationConfig, backend: Accelerator) -> torch.Tensor:
    """`seq` padded to prompt length + `max_answer_seq_len` (every path returns that static width)."""
    return backend.pad_to_static(seq, 1, prompt_len + config.max_answer_seq_len, config.pad_token_id)
