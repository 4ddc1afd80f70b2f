"""Step-3 generation: plain HF `generate`, or the hybrid engine.

The hybrid engine switches the actor into a generation form for one generation phase and back:
- ZeRO-3: the partitioned weights are gathered once per phase (all at once, or in groups of layers)
  into a plain, hook-free copy of the architecture, so decoding runs no per-token collectives;
- LoRA: the adapters are folded into the weights the generation form uses, and the training
  weights are restored exactly afterwards;
- decoding is our own loop over a preallocated static KV cache with fixed shapes (mask and cache
  of prompt + answer length); its per-token step is one module the backend may capture in a
  device graph (`Accelerator.capture_decode_step`);
- models that keep their own static cache (optimum-habana's) decode with their own `generate`; the
  backend may capture their forward in device graphs for the phase only
  (`Accelerator.capture_generate_forward`), put back before any training forward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from accel import Accelerator
from dschat_hal.models.lora import LoRALinear, lora_layers
from dschat_hal.models.lora_fold import FoldedWeight, fold_exactly, unfold_exactly
from dschat_hal.rlhf.memory import PhaseMemory, kv_cache_bytes

log = logging.getLogger(__name__)

MB = 2**20
DYNAMO_RECOMPILE_LIMIT = 8  # torch._dynamo.config.recompile_limit's default: compiled graphs per code object


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


@functools.cache
def _forward_takes(model_class: type, name: str) -> bool:
    return name in inspect.signature(model_class.forward).parameters


def is_partitioned(module: nn.Module) -> bool:
    """Whether `module`'s parameters are ZeRO-3 partitioned."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


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


def pad_answers(seq: torch.Tensor, prompt_len: int, config: GenerationConfig, backend: Accelerator) -> torch.Tensor:
    return backend.pad_to_static(seq, 1, prompt_len + config.max_answer_seq_len, config.pad_token_id)


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


@contextlib.contextmanager
def folded_lora(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Fold LoRA adapters into their weights for the block; the exact training weights come back after,
    with no copy of the weights on the device (`lora_fold`: what the fold's rounding loses, on the host)."""
    layers = [layer for layer in lora_layers(module) if not layer.fused] if enabled else []
    folds: list[FoldedWeight] = []
    try:
        for layer in layers:
            folds.append(fold_exactly(layer))
        yield
    finally:
        for fold in folds:
            unfold_exactly(fold)


class DecodeStep(nn.Module):
    """One decoding step over the static cache: the only thing a backend captures in a device graph.

    It holds the generation form without registering it, so capturing this module's forward never
    touches the forward of a module that trains.
    """

    def __init__(self, model: nn.Module, cache) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.__dict__["cache"] = cache
        self.takes_positions = _forward_takes(type(model), "position_ids")

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
    if _forward_takes(type(model), "position_ids"):
        inputs["position_ids"] = position_ids
    if _forward_takes(type(model), "logits_to_keep"):
        with contiguous_head_input(model):
            return model(**inputs, logits_to_keep=1).logits[:, -1]
    if isinstance(model, head_on_base_output()):
        # 3-D: AutoTP's sharded head slices the last dim of [B, T, H]; contiguous: see contiguous_head_input
        hidden = model.base_model(**inputs)[0][:, -1:].contiguous()
        return model.get_output_embeddings()(hidden)[:, -1]
    return model(**inputs).logits[:, -1]


def static_cache_reason(model: nn.Module) -> str | None:
    """Why the decode loop cannot serve `model` (None when it can)."""
    if _forward_takes(type(model), "token_idx"):
        # optimum-habana's patched classes ignore cache_position, take the past length from the cache's
        # shape and write in place only at a token_idx: transformers' StaticCache is never filled there
        return f"{type(model).__name__} (optimum-habana) keeps its own static KV cache through token_idx"
    if not getattr(type(model), "_can_compile_fullgraph", False):
        return f"{type(model).__name__} has no static KV cache support in this transformers version"
    if not _forward_takes(type(model), "cache_position"):
        return f"{type(model).__name__}.forward takes no cache_position"
    return None


class InferenceCopy:
    """A plain, hook-free copy of a ZeRO-3 partitioned causal LM, refilled by gathering its partitions.

    LoRA layers of the source are folded (W + scaling·(AB)ᵀ) while copying, so the copy is the model
    the actor computes. Parameters are gathered in groups of `group_layers` transformer layers, or
    all at once (`group_layers=0`).
    """

    def __init__(self, source: nn.Module, backend: Accelerator, dtype: torch.dtype) -> None:
        self.source, self.backend, self.dtype = source, backend, dtype
        self.model: nn.Module | None = None
        self.gather_calls = 0  # GatheredParameters blocks entered (one collective round each)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) if self.model is not None else 0

    def full_bytes(self) -> int:
        """Bytes of the gathered model (ZeRO-3 keeps the full shape in `ds_numel`)."""
        lora = {id(p) for layer in lora_layers(self.source) for p in (layer.lora_right_weight, layer.lora_left_weight)}
        sizes = (getattr(p, "ds_numel", p.numel()) for p in self.source.parameters() if id(p) not in lora)
        return sum(sizes) * torch.finfo(self.dtype).bits // 8

    def _build(self) -> nn.Module:
        from transformers.modeling_utils import no_init_weights

        with torch.device(self.backend.device), no_init_weights():
            model = type(self.source)._from_config(self.source.config, torch_dtype=self.dtype)
        model.tie_weights()  # skipped with the weight init: a tied head must not become a second copy
        model.eval().requires_grad_(False)
        for name, buffer in model.named_buffers():
            with contextlib.suppress(AttributeError):
                src = self.source.get_buffer(name)
                if src.shape == buffer.shape:
                    buffer.copy_(src)
        return model

    def groups(self, group_layers: int) -> list[list[str]]:
        """Parameter names of the copy, split into gather groups by transformer-layer index."""
        return _by_layer_group([name for name, _ in self.model.named_parameters()], group_layers)

    def gathered_bytes(self, group_layers: int) -> list[int]:
        """Bytes each gather group of the source (LoRA factors included) takes while gathered."""
        params = dict(self.source.named_parameters())
        return [
            sum(getattr(params[n], "ds_numel", params[n].numel()) * params[n].element_size() for n in names)
            for names in _by_layer_group(list(params), group_layers)
        ]

    @torch.no_grad()
    def refill(self, group_layers: int) -> nn.Module:
        """Gather the source's weights (folding LoRA) into the copy, group by group; returns the copy."""
        if self.model is None:
            self.model = self._build()
        for names in self.groups(group_layers):
            sources = [self._sources(name) for name in names]
            params = list({id(p): p for group in sources for p in group}.values())
            with self._gathered(params):
                self._store(names, dict(self.folded_values(names, sources)))
        return self.model

    def _gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        """One collective round that makes `params` whole for the block."""
        import deepspeed

        self.gather_calls += 1
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def _store(self, names: list[str], full: dict[str, torch.Tensor]) -> None:
        """Copy one group's whole (folded) tensors into the copy."""
        for name in names:
            self.model.get_parameter(name).copy_(full[name])

    def folded_values(self, names: list[str], sources: list[list[nn.Parameter]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, value) of each gathered source weight, with its LoRA delta folded in where it has one."""
        for name, (weight, *lora) in zip(names, sources, strict=True):
            value = weight.data
            if lora:
                value = value + self.source.get_submodule(name.rpartition(".")[0]).delta().to(value.dtype)
            yield name, value

    def _sources(self, name: str) -> list[nn.Parameter]:
        """The source parameter behind a copy parameter, with its LoRA factors when it has them."""
        owner_name, _, leaf = name.rpartition(".")
        owner = self.source.get_submodule(owner_name) if owner_name else self.source
        if isinstance(owner, LoRALinear) and leaf == "weight":
            return [owner.weight, owner.lora_right_weight, owner.lora_left_weight]
        return [getattr(owner, leaf)]

    def release(self) -> None:
        self.model = None
        self.backend.empty_cache()


def _by_layer_group(names: list[str], group_layers: int) -> list[list[str]]:
    """`names` split by transformer-layer index into groups of `group_layers` layers (one group: all)."""
    if group_layers <= 0:
        return [names]
    keyed: dict[object, list[str]] = {}
    for name in names:
        match = re.search(r"\.(\d+)\.", name)
        key = int(match.group(1)) // group_layers if match else "rest"
        keyed.setdefault(key, []).append(name)
    return list(keyed.values())


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
        from transformers import StaticCache

        param = next(model.parameters())
        return StaticCache(
            config=model.config, max_batch_size=batch, max_cache_len=length, device=param.device, dtype=param.dtype
        )

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
            sum(t.numel() * t.element_size() for t in _cache_tensors(self._cache)) / MB,
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
        """Prefill, then one token per step until every row ended (or max_answer_seq_len); rows not
        `active` (filler) count as ended from the start."""
        cfg, backend = self.config, self.backend
        batch, prompt_len = prompts.shape
        total = prompt_len + cfg.max_answer_seq_len
        cache, step = self._static_cache(model, batch, total)
        mask = prompt_mask.new_zeros(batch, total)
        mask[:, :prompt_len] = prompt_mask
        positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        cache_position = torch.arange(prompt_len, device=prompts.device)
        logits = last_logits(model, prompts, mask, positions, cache, cache_position)
        backend.mark_step()
        answers = prompts.new_full((batch, cfg.max_answer_seq_len), cfg.pad_token_id)
        logprobs = prompts.new_zeros((batch, cfg.max_answer_seq_len), dtype=torch.float32)
        unfinished = torch.ones(batch, dtype=torch.bool, device=prompts.device) if active is None else active.clone()
        next_position = prompt_mask.long().sum(-1, keepdim=True)
        stop_on_eos = cfg.eos_token_id is not None and not cfg.ignore_eos
        # writes at a device index, not a Python offset: every step is the same graph (lazy mode)
        answer_index = torch.zeros(1, dtype=torch.long, device=prompts.device)
        for t in range(cfg.max_answer_seq_len):
            token = torch.where(unfinished, self._pick(logits), cfg.pad_token_id)
            answers.index_copy_(1, answer_index, token[:, None])
            if cfg.return_logprobs:
                picked = torch.where(unfinished, sampled_logprobs(logits, token), 0.0)
                logprobs.index_copy_(1, answer_index, picked[:, None])
            if stop_on_eos:
                unfinished &= ~is_end(token, cfg)
            if t + 1 == cfg.max_answer_seq_len or not bool(unfinished.any()):
                break
            cache_position = cache_position[-1:] + 1
            mask.index_fill_(1, cache_position, 1)
            answer_index += 1
            logits = step(token[:, None], mask, next_position, cache_position)
            backend.mark_step()
            next_position = next_position + 1
        self.rollout_logprobs = logprobs if cfg.return_logprobs else None
        return torch.cat([prompts, answers], dim=1)

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


def _cache_tensors(cache) -> list[torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [
            t
            for layer in layers
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if t is not None
        ]
    return [*getattr(cache, "key_cache", []), *getattr(cache, "value_cache", [])]
