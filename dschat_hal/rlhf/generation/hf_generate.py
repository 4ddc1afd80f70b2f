"""HF `generate` with step 3's sampling semantics: the plain path (`PlainGenerator`, on the training
module: synced ranks under ZeRO-3, LoRA folded otherwise) and the hybrid engine's fallback for models
its decode loop cannot serve (optimum-habana's classes keep their own static cache). The backend may
capture the model's forward in device graphs for a generation phase (`Accelerator.capture_generate_forward`:
optimum-habana's models in HPU graphs), put back before any training forward; a logits processor keeps
the sampled tokens' log-probs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from accel import Accelerator
from dschat_hal.rlhf.generation.inference_copy import folded_lora, is_partitioned
from dschat_hal.rlhf.generation.sampling import GenerationConfig, pad_answers

log = logging.getLogger(__name__)


class SampledLogprobRecorder:
    """A logits processor for HF `generate` that keeps the log-prob of each sampled token: at every
    step it holds the step's fp32 log-softmax until the next step shows which token was picked (at
    position prompt length + step − 1: right-padded static layouts agree), so only one step's
    distribution is ever kept. `finish(seq)` scores the last step and returns (batch,
    max_answer_seq_len) log-probs, zeros where nothing was generated."""

    def __init__(self, prompt_len: int, max_answer_len: int) -> None:
        self.prompt_len, self.max_answer_len = prompt_len, max_answer_len
        self.pending: torch.Tensor | None = None
        self.found: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._score_pending(input_ids)
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _score_pending(self, seq: torch.Tensor) -> None:
        if self.pending is not None:
            token = seq[:, self.prompt_len + len(self.found)]
            self.found.append(self.pending.gather(-1, token[:, None]).squeeze(-1))
            self.pending = None

    def finish(self, seq: torch.Tensor) -> torch.Tensor:
        if self.pending is not None and seq.size(1) > self.prompt_len + len(self.found):
            self._score_pending(seq)
        found = torch.stack(self.found, 1) if self.found else seq.new_zeros(seq.size(0), 0, dtype=torch.float32)
        return torch.nn.functional.pad(found, (0, self.max_answer_len - found.size(1)))


def hf_generate(
    model: nn.Module,
    prompts: torch.Tensor,
    mask: torch.Tensor,
    config: GenerationConfig,
    *,
    synced_gpus: bool = False,
    recorder: SampledLogprobRecorder | None = None,
    **extra,
) -> torch.Tensor:
    """HF `generate` with step 3's sampling semantics (top-k 0, top-p 1); `recorder`, when given,
    sees the raw scores of every step (a logits processor before the temperature)."""
    from transformers import LogitsProcessorList

    fixed = {"min_new_tokens": config.max_answer_seq_len} if config.ignore_eos else {}
    sampling = {"temperature": config.temperature, "top_k": 0, "top_p": 1.0} if config.do_sample else {}
    if recorder is not None:
        extra["logits_processor"] = LogitsProcessorList([recorder])
    return model.generate(
        input_ids=prompts,
        attention_mask=mask,
        max_new_tokens=config.max_answer_seq_len,
        do_sample=config.do_sample,
        pad_token_id=config.pad_token_id,
        eos_token_id=config.eos_token_id,
        synced_gpus=synced_gpus,
        use_cache=True,
        **sampling,
        **fixed,
        **extra,
    )


def recorder_for(prompts: torch.Tensor, config: GenerationConfig) -> SampledLogprobRecorder | None:
    """A log-prob recorder for one HF `generate` call when `config.return_logprobs`, else None."""
    return SampledLogprobRecorder(prompts.size(1), config.max_answer_seq_len) if config.return_logprobs else None


class PlainGenerator:
    """The default path: HF `generate` on the training module (synced ranks under ZeRO-3, LoRA unfolded there).

    Not partitioned, the module's forward is the backend's captured one during generation where the backend
    captures that way (`Accelerator.capture_generate_forward`: optimum-habana's models in HPU graphs), put
    back after each phase and kept for the next, as HabanaAI's fork does on its plain path."""

    def __init__(self, actor, backend: Accelerator, config: GenerationConfig) -> None:
        self.actor, self.backend, self.config = actor, backend, config
        self.synced = is_partitioned(actor.module)
        self.rollout_logprobs: torch.Tensor | None = None  # the last `generate`'s, with `return_logprobs`
        self._forward: Callable | None = None
        self._captured = False  # whether the backend was asked for `_forward` yet (on the first phase)

    def _graphed_forward(self, module: nn.Module) -> Callable | None:
        """The captured forward (asked for once, kept across phases); None where generation runs uncaptured,
        said once when device graphs are on."""
        if self._captured:
            return self._forward
        self._captured = True
        if not self.synced:
            self._forward = self.backend.capture_generate_forward(module)
        if self.backend.use_graphs and self._forward is None:
            if self.synced:
                log.info(
                    "generation: the ZeRO-3 actor generates with synced ranks through DeepSpeed's hooks, not in "
                    "device graphs; --enable_hybrid_engine captures its generation"
                )
            else:
                log.info(
                    "generation: device graphs capture the hybrid engine's decode step; add --enable_hybrid_engine"
                )
        return self._forward

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, mask: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        module = self.actor.module
        forward = self._graphed_forward(module)
        self.actor.eval()
        try:
            with (
                folded_lora(module, enabled=not self.synced),
                self.backend.generation_context(module) as model,
                forward_replaced(model, forward),
            ):
                extra = self.backend.generate_kwargs(graphs=forward is not None) | generate_kwargs
                recorder = recorder_for(prompts, self.config)
                seq = hf_generate(
                    model, prompts, mask, self.config, synced_gpus=self.synced, recorder=recorder, **extra
                )
        finally:
            self.actor.train()
        self.rollout_logprobs = None if recorder is None else recorder.finish(seq)
        return pad_answers(seq, prompts.size(1), self.config, self.backend)

    def kept_form(self) -> None:
        """No separate inference form: forwards go through the actor's engine."""
        return None


@contextlib.contextmanager
def forward_replaced(model: nn.Module, forward: Callable | None) -> Iterator[None]:
    """`model.forward` is `forward` for the block (nothing changes when it is None), then what it was."""
    if forward is None:
        yield
        return
    had_own = "forward" in model.__dict__
    own = model.__dict__.get("forward")
    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = own
        else:
            del model.forward
