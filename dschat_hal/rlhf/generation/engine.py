"""The hybrid engine: generation in the actor's generation form, switched in for one generation phase
and back. It chooses how each phase decodes:
- its own loop over a preallocated static KV cache (`decode`), one cache and decode-step capture kept
  per shape where the backend captures with fixed shapes;
- HF `generate` (`hf_generate`) for models that keep their own static cache (optimum-habana's), their
  forward captured by the backend for the phase only.
The generation form is the ZeRO-3 inference copy gathered once per phase (all at once, or in groups of
layers when the device memory asks for it), or the actor with LoRA folded in (`inference_copy`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from accel import Accelerator
from dschat_hal.models.capabilities import static_cache_reason
from dschat_hal.rlhf.generation.decode import DecodeStep, cache_tensors, decode_tokens, new_static_cache
from dschat_hal.rlhf.generation.hf_generate import (
    SampledLogprobRecorder,
    forward_replaced,
    hf_generate,
    recorder_for,
)
from dschat_hal.rlhf.generation.inference_copy import InferenceCopy, folded_lora, is_partitioned
from dschat_hal.rlhf.generation.sampling import GenerationConfig, next_token, pad_answers
from dschat_hal.rlhf.memory import PhaseMemory, kv_cache_bytes

log = logging.getLogger(__name__)

MB = 2**20
DYNAMO_RECOMPILE_LIMIT = 8  # torch._dynamo.config.recompile_limit's default: compiled graphs per code object


class HybridEngine:
    """Generation in the actor's generation form (see the module docstring); `generate` pads to
    prompt length + `max_answer_seq_len` like the plain path."""

    def __init__(
        self,
        actor,
        backend: Accelerator,
        config: GenerationConfig,
        *,
        dtype: torch.dtype,
        gather_group_layers: int = 8,
        release_inference_cache: bool = False,
        unpin_actor_parameters: bool = False,
    ) -> None:
        self.actor, self.backend, self.config, self.dtype = actor, backend, config, dtype
        self.group_layers = gather_group_layers
        self.release_cache, self.unpin = release_inference_cache, unpin_actor_parameters
        self.zero3 = is_partitioned(actor.module)
        self.copy = InferenceCopy(actor.module, backend, dtype) if self.zero3 else None
        self._cache = None
        self._cache_key: tuple | None = None
        self._step = None
        # fixed shapes where the decode step is captured: one cache and capture kept per shape (a new
        # cache for a shape seen before would be a new device-graph recording), smaller batches padded
        self.static_shapes = backend.static_generation_shapes
        self._captures: dict[tuple, tuple] = {}
        self._graphed_forwards: dict[int, Callable | None] = {}  # HF-generate fallback: per generation form
        self._rows = 0
        self.rollout_logprobs: torch.Tensor | None = None  # the last `generate`'s, with `return_logprobs`
        self._logged_shapes = 0
        self._gather_mode_logged = False
        self.fallback_reason = static_cache_reason(actor.module)
        if self.fallback_reason:
            log.info("hybrid engine: falling back to HF generate: %s", self.fallback_reason)

    # ---- the generation form ---------------------------------------------------------------------
    def phase_memory(self, batch: int, positions: int) -> PhaseMemory:
        """What the next phase allocates on the device: the copy and the KV cache where not kept from before."""
        cached = self._cache_key is not None and self._cache_key[1:] == (batch, positions)
        cached = cached or any(key[1:] == (batch, positions) for key in self._captures)
        module = self.actor.module
        kv = 0 if cached else kv_cache_bytes(module.config, batch, positions, self.dtype)
        if self.copy is None:
            return PhaseMemory(0, 0, 0, kv, (batch, positions))
        groups = self.copy.gathered_bytes(self.group_layers)
        copy = 0 if self.copy.model is not None else self.copy.full_bytes()
        return PhaseMemory(copy, sum(groups), max(groups), kv, (batch, positions))

    def _free_memory(self) -> int | None:
        """The device memory free to each rank (the least; ranks must agree on how they gather); host
        memory is shared by the ranks on the host (`Accelerator.rank_memory`)."""
        import torch.distributed as dist

        free = self.backend.rank_memory()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return free
        unknown = 2**62
        least = torch.tensor([unknown if free is None else free], dtype=torch.int64, device=self.backend.device)
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        return None if int(least.item()) == unknown else int(least.item())

    def _group_layers(self, needs: PhaseMemory) -> int:
        """All at once when the gathered model and the KV cache fit beside what is allocated, else layer
        groups; a one-line UserError before generating when neither fits."""
        free = self._free_memory()
        group = needs.group_layers(free, self.group_layers, zero3=self.copy is not None)
        if self.copy is not None and not self._gather_mode_logged:
            how = "all at once" if group == 0 else f"in groups of {group} layers (--tp_gather_partition_size)"
            free_text = "unknown" if free is None else f"{free / MB:.0f} MB"
            log.info(
                "hybrid engine: ZeRO-3 actor gathered %s per generation phase (needs %.0f MB with the KV cache, free %s)",
                how,
                (needs.all_at_once() if group == 0 else needs.grouped()) / MB,
                free_text,
            )
            self._gather_mode_logged = True
        return group

    @contextlib.contextmanager
    def generation_form(self, group_layers: int = 0) -> Iterator[nn.Module]:
        """The actor as one plain model with LoRA folded in, for the duration of the block (ZeRO-3:
        gathered in groups of `group_layers` layers, 0: all at once)."""
        if self.copy is not None:
            first = self.copy.model is None
            model = self.copy.refill(group_layers)
            if first:
                log.info(
                    "hybrid engine: hook-free inference copy of the actor: %.1f MB (%s between phases)",
                    self.copy.nbytes / MB,
                    "freed" if self.unpin else "kept; --unpin_actor_parameters frees it",
                )
            try:
                yield model
            finally:
                if self.unpin:
                    self.copy.release()
            return
        module = self.actor.module
        self.actor.eval()
        try:
            with folded_lora(module):
                yield module
        finally:
            self.actor.train()

    def kept_form(self) -> nn.Module | None:
        """The ZeRO-3 actor's gathered inference copy when it is kept between phases (the weights the
        actor has until its next optimizer step, LoRA folded), for forwards over whole sequences
        without a second gather; None otherwise (not ZeRO-3, `--unpin_actor_parameters`, HF fallback)."""
        if self.copy is None or self.copy.model is None or self.unpin or self.fallback_reason:
            return None
        return self.copy.model

    # ---- decoding --------------------------------------------------------------------------------
    def _static_cache(self, model: nn.Module, batch: int, length: int):
        key = (id(model), batch, length)
        if self._cache_key == key:
            self._cache.reset()
        elif key in self._captures:
            self._cache, self._step = self._captures[key]
            self._cache_key = key
            self._cache.reset()
        else:
            self._cache = self._new_cache(model, batch, length)
            self._cache_key = key
            self._step = self._capture(DecodeStep(model, self._cache))
            if self.static_shapes:
                self._captures[key] = (self._cache, self._step)
            self._log_new_cache(batch, length)
        return self._cache, self._step

    def _new_cache(self, model: nn.Module, batch: int, length: int):
        return new_static_cache(model, batch, length)

    def _capture(self, step: nn.Module):
        return self.backend.capture_decode_step(step)

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row (the tensor-parallel engine makes its group agree on it)."""
        return next_token(logits, self.config)

    def _log_new_cache(self, batch: int, length: int) -> None:
        """Once per capture with fixed shapes (a few buckets); without, the first cache only (a new
        prompt length is a new cache: debug)."""
        self._logged_shapes += 1
        captured = len(self._captures)
        level = logging.INFO if self._logged_shapes == 1 or self.static_shapes else logging.DEBUG
        log.log(
            level,
            "hybrid engine: static KV cache for batch %d x %d positions: %.1f MB%s",
            batch,
            length,
            sum(t.numel() * t.element_size() for t in cache_tensors(self._cache)) / MB,
            f" (decode-step capture {captured})" if self.static_shapes else "",
        )
        if self.static_shapes and captured == DYNAMO_RECOMPILE_LIMIT + 1:
            log.warning(
                "hybrid engine: %d decode shapes captured; torch.compile stops capturing past %d "
                "(torch._dynamo recompile_limit): use at most %d --bucket_lengths",
                captured,
                DYNAMO_RECOMPILE_LIMIT,
                DYNAMO_RECOMPILE_LIMIT - 1,
            )

    def _release_cache(self) -> None:
        self._cache = self._cache_key = self._step = None
        self._captures.clear()
        self._graphed_forwards.clear()
        self.backend.empty_cache()

    def _pad_rows(self, prompts: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed shapes: a smaller batch (the last one) repeats its last row up to the largest batch."""
        self._rows = max(self._rows, prompts.size(0))
        missing = self._rows - prompts.size(0)
        if not self.static_shapes or missing == 0:
            return prompts, mask
        return tuple(torch.cat([t, t[-1:].expand(missing, -1)]) for t in (prompts, mask))

    def decode(
        self, model: nn.Module, prompts: torch.Tensor, prompt_mask: torch.Tensor, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Prefill, then one token per step until every row ended (or max_answer_seq_len), on this
        shape's static cache and decode step (`decode.decode_tokens`); rows not `active` (filler) count
        as ended from the start."""
        batch, prompt_len = prompts.shape
        cache, step = self._static_cache(model, batch, prompt_len + self.config.max_answer_seq_len)
        seq, self.rollout_logprobs = decode_tokens(
            model, step, cache, prompts, prompt_mask, self.config, self.backend, self._pick, active
        )
        return seq

    def generate_with_model(
        self,
        model: nn.Module,
        prompts: torch.Tensor,
        mask: torch.Tensor,
        recorder: SampledLogprobRecorder | None = None,
    ) -> torch.Tensor:
        """The model's own `generate` (the fallback), its forward in the backend's device graphs where it
        captures them: one graph per shape, kept for later phases with the generation form; `recorder`
        keeps the sampled tokens' log-probs."""
        if id(model) not in self._graphed_forwards:
            self._graphed_forwards[id(model)] = self.backend.capture_generate_forward(model)
        forward = self._graphed_forwards[id(model)]
        with forward_replaced(model, forward):
            extra = self.backend.generate_kwargs(graphs=forward is not None)
            return hf_generate(model, prompts, mask, self.config, recorder=recorder, **extra)

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = prompts.size(0)
        padded_rows = max(self._rows, rows) if self.static_shapes else rows
        group = self._group_layers(self.phase_memory(padded_rows, prompts.size(1) + self.config.max_answer_seq_len))
        with self.generation_form(group) as model, self.backend.generation_context(model):
            if self.fallback_reason:
                padded_prompts, padded_mask = self._pad_rows(prompts, mask)
                recorder = recorder_for(padded_prompts, self.config)
                seq = self.generate_with_model(model, padded_prompts, padded_mask, recorder=recorder)
                self.rollout_logprobs = None if recorder is None else recorder.finish(seq)[:rows]
                seq = seq[:rows]
            else:
                seq = self.decode(model, *self._pad_rows(prompts, mask))[:rows]
                if self.rollout_logprobs is not None:
                    self.rollout_logprobs = self.rollout_logprobs[:rows]
        if self.release_cache or (self.copy is not None and self.unpin):
            self._release_cache()
        return pad_answers(seq, prompts.size(1), self.config, self.backend)
