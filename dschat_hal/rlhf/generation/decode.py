"""The static-cache decode loop, written as gpt-fast writes it: `prefill` fills a preallocated KV cache
(prompt + answer length: fixed shapes) with the prompts, `decode_one_token` runs one step over it through
`DecodeStep` (the one module a backend may capture in a device graph, `Accelerator.capture_decode_step`),
and `decode_tokens` is the loop that calls them. Both return logits; the loop picks the token (with a
`pick` the caller gives: the tensor-parallel engine makes its group agree on it)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from accel import Accelerator
from dschat_hal.models.capabilities import forward_takes
from dschat_hal.rlhf.generation.sampling import GenerationConfig, is_end, sampled_logprobs


def new_static_cache(model: nn.Module, batch: int, length: int, **options):
    """transformers' `StaticCache` for `batch` rows of `length` positions, on `model`'s device and dtype
    (`options`: e.g. `tp_size`, this rank's share of the key/value heads)."""
    from transformers import StaticCache

    param = next(model.parameters())
    return StaticCache(
        config=model.config,
        max_batch_size=batch,
        max_cache_len=length,
        device=param.device,
        dtype=param.dtype,
        **options,
    )


def cache_tensors(cache) -> list[torch.Tensor]:
    """The key and value tensors a cache holds (allocated ones: their bytes are the cache's size)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [
            t
            for layer in layers
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if t is not None
        ]
    return [*getattr(cache, "key_cache", []), *getattr(cache, "value_cache", [])]


class DecodeStep(nn.Module):
    """One decoding step over the static cache: the only thing a backend captures in a device graph.

    It holds the generation form without registering it, so capturing this module's forward never
    touches the forward of a module that trains.
    """

    def __init__(self, model: nn.Module, cache) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.__dict__["cache"] = cache
        self.takes_positions = forward_takes(type(model), "position_ids")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
    ) -> torch.Tensor:
        extra = {"position_ids": position_ids} if self.takes_positions else {}
        # `forward`, not the call: a DeepSpeed engine's hooks on the module (timers, profiler) would break the graph
        out = self.model.forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=self.cache,
            cache_position=cache_position,
            use_cache=True,
            **extra,
        )
        return out.logits[:, -1]


@functools.cache
def head_on_base_output() -> tuple[type, ...]:
    """Causal LMs whose forward is `lm_head(base_model(...)[0])` but takes no `logits_to_keep`: the prefill
    computes the head on the last position only (the head over a whole prompt is ~10% of OPT-125m's
    work). Matched with isinstance, so subclasses (optimum-habana's Gaudi classes) match too."""
    from transformers.models.bloom.modeling_bloom import BloomForCausalLM
    from transformers.models.opt.modeling_opt import OPTForCausalLM

    return (OPTForCausalLM, BloomForCausalLM)


@contextlib.contextmanager
def contiguous_head_input(module: nn.Module) -> Iterator[None]:
    """For the block, the output head gets a contiguous input. HF slices the hidden states before the
    head (`logits_to_keep`), and torch's matmul on a 3-D input that cannot be viewed as 2-D with a
    weight that needs no grad (a frozen or inference copy) broadcasts the weight over the batch: a copy of
    the vocabulary matrix per row (OPT-125m, 4 rows: ~1 s on a CPU core and 4 x 77 MB; on any device
    batch x the head's size in transient memory) instead of one matmul."""
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def last_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache,
    cache_position: torch.Tensor,
) -> torch.Tensor:
    """Logits of the last position after a prefill forward that fills `cache`."""
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "past_key_values": cache,
        "cache_position": cache_position,
        "use_cache": True,
    }
    if forward_takes(type(model), "position_ids"):
        inputs["position_ids"] = position_ids
    if forward_takes(type(model), "logits_to_keep"):
        with contiguous_head_input(model):
            return model(**inputs, logits_to_keep=1).logits[:, -1]
    if isinstance(model, head_on_base_output()):
        # 3-D: AutoTP's sharded head slices the last dim of [B, T, H]; contiguous: see contiguous_head_input
        hidden = model.base_model(**inputs)[0][:, -1:].contiguous()
        return model.get_output_embeddings()(hidden)[:, -1]
    return model(**inputs).logits[:, -1]


def prefill(
    model: nn.Module, prompts: torch.Tensor, prompt_mask: torch.Tensor, mask: torch.Tensor, cache
) -> torch.Tensor:
    """The prompts (left-padded, `prompt_mask`) through `model`, filling `cache` at positions
    [0, prompt length) under the whole-length `mask`; the last position's logits."""
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache_position = torch.arange(prompts.size(1), device=prompts.device)
    return last_logits(model, prompts, mask, positions, cache, cache_position)


def decode_one_token(
    step: Callable[..., torch.Tensor],
    token: torch.Tensor,
    mask: torch.Tensor,
    position: torch.Tensor,
    cache_position: torch.Tensor,
) -> torch.Tensor:
    """One token per row (at model position `position`, cache slot `cache_position`) through `step`
    (a `DecodeStep`, captured or not), which writes it into the cache; the next logits."""
    return step(token[:, None], mask, position, cache_position)


def decode_tokens(
    model: nn.Module,
    step: Callable[..., torch.Tensor],
    cache,
    prompts: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: GenerationConfig,
    backend: Accelerator,
    pick: Callable[[torch.Tensor], torch.Tensor],
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prefill, then one token per step until every row ended (or max_answer_seq_len); rows not
    `active` (filler) count as ended from the start. `cache` holds prompt + answer length positions and
    `step` decodes over it. Returns prompts + answers and, with `config.return_logprobs`, each sampled
    token's log-prob (zeros past a row's end; else None)."""
    cfg = config
    batch, prompt_len = prompts.shape
    mask = prompt_mask.new_zeros(batch, prompt_len + cfg.max_answer_seq_len)
    mask[:, :prompt_len] = prompt_mask
    logits = prefill(model, prompts, prompt_mask, mask, cache)
    backend.mark_step()
    answers = prompts.new_full((batch, cfg.max_answer_seq_len), cfg.pad_token_id)
    logprobs = prompts.new_zeros((batch, cfg.max_answer_seq_len), dtype=torch.float32)
    unfinished = torch.ones(batch, dtype=torch.bool, device=prompts.device) if active is None else active.clone()
    next_position = prompt_mask.long().sum(-1, keepdim=True)
    cache_position = torch.arange(prompt_len - 1, prompt_len, device=prompts.device)  # the prompt's last slot
    stop_on_eos = cfg.eos_token_id is not None and not cfg.ignore_eos
    # writes at a device index, not a Python offset: every step is the same graph (lazy mode)
    answer_index = torch.zeros(1, dtype=torch.long, device=prompts.device)
    for t in range(cfg.max_answer_seq_len):
        token = torch.where(unfinished, pick(logits), cfg.pad_token_id)
        answers.index_copy_(1, answer_index, token[:, None])
        if cfg.return_logprobs:
            picked = torch.where(unfinished, sampled_logprobs(logits, token), 0.0)
            logprobs.index_copy_(1, answer_index, picked[:, None])
        if stop_on_eos:
            unfinished &= ~is_end(token, cfg)
        if t + 1 == cfg.max_answer_seq_len or not bool(unfinished.any()):
            break
        cache_position = cache_position + 1
        mask.index_fill_(1, cache_position, 1)
        answer_index += 1
        logits = decode_one_token(step, token, mask, next_position, cache_position)
        backend.mark_step()
        next_position = next_position + 1
    return torch.cat([prompts, answers], dim=1), logprobs if cfg.return_logprobs else None
