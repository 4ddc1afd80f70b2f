"""Tensor-parallel generation (`--inference_tp_size T`): the hybrid engine's generation form sharded
over groups of T ranks by DeepSpeed's AutoTP.

- groups: ranks `[g*T, ..., g*T + T-1]`; each rank of a group all-gathers the group's prompts,
  the group decodes them together, and each rank takes back its own rows;
- the form: the actor's architecture built on the meta device (no rank ever materialises the whole
  model), sharded by `deepspeed.init_inference(..., replace_with_kernel_inject=False)` with our TP
  group (`LinearLayer`/`LinearAllreduce`, the head as AutoTP leaves it), then filled each phase from
  the training weights: gathered under ZeRO-3 all at once or in groups of layers, LoRA folded, each
  tensor cut by its AutoTP layer's own partition rule;
- decoding is the hybrid engine's loop over a static KV cache holding 1/T of the KV heads; the
  group's first rank broadcasts every chosen token, so the ranks of a group always agree and run the
  same number of steps;
- `make_hybrid_engine` (the package's entry) chooses this engine where AutoTP can shard the actor,
  else the whole-model `HybridEngine`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from accel import Accelerator
from dschat_hal.models.capabilities import kv_heads, tp_unsupported_reason
from dschat_hal.rlhf.generation.decode import cache_tensors, new_static_cache
from dschat_hal.rlhf.generation.engine import MB, HybridEngine
from dschat_hal.rlhf.generation.inference_copy import InferenceCopy, is_partitioned
from dschat_hal.rlhf.generation.sampling import GenerationConfig, pad_answers

log = logging.getLogger(__name__)


@dataclass
class TPGroup:
    """This rank's tensor-parallel group: consecutive ranks `ranks`, this rank at `index`."""

    ranks: list[int]
    index: int
    group: object  # torch.distributed ProcessGroup

    @property
    def size(self) -> int:
        return len(self.ranks)

    def get_model_parallel_group(self):  # DeepSpeed's mpu interface (init_inference)
        return self.group

    def get_model_parallel_world_size(self) -> int:
        return self.size

    def get_model_parallel_rank(self) -> int:
        return self.index


_GROUPS: dict[int, TPGroup] = {}


def make_tp_group(tp_size: int) -> TPGroup:
    """Create every group of `tp_size` consecutive ranks (collective: all ranks call it, once per size)
    and return this rank's."""
    if tp_size in _GROUPS:
        return _GROUPS[tp_size]
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, tp_size):
        ranks = list(range(start, start + tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = TPGroup(ranks, ranks.index(rank), group)
    assert mine is not None
    _GROUPS[tp_size] = mine
    return mine


def layer_bytes(model: nn.Module) -> int:
    """Bytes of the transformer layers' parameters (names with a layer index)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if re.search(r"\.\d+\.", n))


class TensorParallelForm(InferenceCopy):
    """The actor's inference form, sharded over a TP group by AutoTP and refilled from the training
    weights (LoRA folded) each phase; ZeRO-3 partitions are gathered in groups of layers."""

    def __init__(self, source: nn.Module, backend: Accelerator, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__(source, backend, dtype)
        self.tp = tp
        self.partitioned = is_partitioned(source)

    def _build(self) -> nn.Module:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from transformers.modeling_utils import no_init_weights

        with torch.device("meta"), no_init_weights():
            model = type(self.source)._from_config(self.source.config, torch_dtype=self.dtype)
        model.tie_weights()
        model.eval().requires_grad_(False)
        ds = get_accelerator()
        rng = torch.get_rng_state(), ds.get_rng_state()  # init_inference broadcasts rank 0's RNG to all ranks
        with contextlib.redirect_stdout(io.StringIO()):  # AutoTP prints its policy on every rank
            engine = deepspeed.init_inference(
                model,
                tensor_parallel={"tp_size": self.tp.size, "mpu": self.tp, "tp_group": self.tp.group},
                dtype=self.dtype,
                replace_with_kernel_inject=False,
            )
        torch.set_rng_state(rng[0])
        ds.set_rng_state(rng[1])
        model = engine.module  # on the device: the meta tensors were materialised empty
        self._share_tied_vocabulary(model)
        for name, buffer in model.named_buffers():
            try:
                source = self.source.get_buffer(name)
            except AttributeError:
                raise RuntimeError(f"tensor-parallel form: buffer {name} has no counterpart in the actor") from None
            buffer.copy_(source.to(buffer.device))
        return model

    def _share_tied_vocabulary(self, model: nn.Module) -> None:
        """AutoTP's inference path cuts the head row-parallel and unties it from the input embedding: a
        whole vocabulary matrix plus half of another per rank. A tied model keeps one shard instead:
        DeepSpeed's vocabulary-parallel embedding on the shard of a column-parallel head whose logits are
        gathered over the group."""
        from deepspeed.module_inject.layers import VocabParallelEmbedding, VocabParallelLinear
        from deepspeed.module_inject.tp_shard import AutoTPMeta

        embedding = model.get_input_embeddings()
        if not getattr(model.config, "tie_word_embeddings", False) or type(embedding) is not nn.Embedding:
            return
        vocab, hidden = embedding.weight.shape
        meta = AutoTPMeta.from_model_config(model.config, tp_grain_size=64)
        with torch.device("meta"):
            head = VocabParallelLinear(
                nn.Linear(hidden, vocab, bias=False), self.tp.group, name="lm_head", tp_meta=meta
            )
        head.to_empty(device=embedding.weight.device)
        head.weight.requires_grad_(False)
        head.gather_output = True  # full logits on every rank of the group (one all-gather per step)
        shared = VocabParallelEmbedding(
            embedding, self.tp.group, tied_vocab_parallel_linear=head, name="embed_tokens", tp_meta=meta
        )
        model.set_input_embeddings(shared)
        model.set_output_embeddings(head)

    def _gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        return super()._gathered(params) if self.partitioned else contextlib.nullcontext()

    def _store(self, names: list[str], full: dict[str, torch.Tensor]) -> None:
        """Fill every shard of the group from the source's whole (LoRA-folded) weights."""
        for owner_name in dict.fromkeys(name.rpartition(".")[0] for name in names):
            self._fill(owner_name, full)

    def _fill(self, owner_name: str, full: dict[str, torch.Tensor]) -> None:
        """Copy one module's full tensors into the form: an AutoTP layer through its own cut (weight
        and bias together, on new tensor objects so the gathered ones stay whole), others as they are."""
        from deepspeed.module_inject.layers import TensorParallel_Layer

        owner = self.model.get_submodule(owner_name) if owner_name else self.model
        prefix = f"{owner_name}." if owner_name else ""
        if isinstance(owner, TensorParallel_Layer):
            targets = [owner.weight, getattr(owner, "bias", None)]
            pieces = [full.get(prefix + leaf) for leaf in ("weight", "bias")]
            pieces = [t.detach() if t is not None else None for t in pieces]
            owner._tp_partition(pieces)
        else:
            leaves = [leaf for leaf, _ in owner.named_parameters(recurse=False)]
            targets = [getattr(owner, leaf) for leaf in leaves]
            pieces = [full.get(prefix + leaf) for leaf in leaves]
        for target, piece in zip(targets, pieces, strict=True):
            if target is not None and piece is not None:
                target.copy_(piece)


class TensorParallelEngine(HybridEngine):
    """The hybrid engine generating on a tensor-parallel form shared by a group of ranks."""

    def __init__(self, actor, backend: Accelerator, config: GenerationConfig, *, tp_size: int, **options) -> None:
        super().__init__(actor, backend, config, **options)
        self.copy = None  # the plain gathered copy is replaced by the sharded form
        backend.prepare_tensor_parallel(tp_size, dist.get_world_size())
        self.tp = make_tp_group(tp_size)
        self.form = TensorParallelForm(actor.module, backend, options["dtype"], self.tp)
        self._logged = False

    # ---- the generation form -------------------------------------------------------------------
    def _group_layers(self) -> int:
        """All at once when every rank can hold the gathered model beside its shard, else groups of
        layers; decided by all ranks together (the gathers are collective)."""
        if not self.form.partitioned:
            return 0
        needed = self.form.full_bytes() * (1 + (self.form.model is None) / self.tp.size)
        free = self.backend.rank_memory()
        fits = torch.tensor([int(free is None or needed < 0.8 * free)], device=self.backend.device)
        dist.all_reduce(fits, op=dist.ReduceOp.MIN)
        return 0 if bool(fits.item()) else self.group_layers

    @contextlib.contextmanager
    def generation_form(self) -> Iterator[nn.Module]:
        model = self.form.refill(self._group_layers())
        if not self._logged:
            log.info(
                "hybrid engine: rank %d, TP group %s (index %d of %d): tensor-parallel copy %.1f MB "
                "(transformer layers %.1f MB; the whole model is %.1f MB)",
                dist.get_rank(),
                self.tp.ranks,
                self.tp.index,
                self.tp.size,
                self.form.nbytes / MB,
                layer_bytes(model) / MB,
                self.form.full_bytes() / MB,
                extra={"all_ranks": True},  # each rank's own shard: every rank says it
            )
            self._logged = True
        try:
            yield model
        finally:
            if self.unpin:
                self.form.release()

    # ---- decoding hooks ------------------------------------------------------------------------
    def _new_cache(self, model: nn.Module, batch: int, length: int):
        cache = new_static_cache(model, batch, length, tp_size=self.tp.size)  # this rank's 1/T of the KV heads
        log.info(
            "hybrid engine: rank %d, TP group %s: KV cache of %d of %d key/value heads for the group's %d rows: %.1f MB",
            dist.get_rank(),
            self.tp.ranks,
            kv_heads(model.config) // self.tp.size,
            kv_heads(model.config),
            batch,
            sum(t.numel() * t.element_size() for t in cache_tensors(cache)) / MB,
        )
        return cache

    def _capture(self, step: nn.Module):
        return step  # DeepSpeed refuses device graphs around tensor-parallel collectives

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        token = super()._pick(logits)
        dist.broadcast(token, src=self.tp.ranks[0], group=self.tp.group)  # one sampler per group
        return token

    # ---- one phase -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows, length = prompts.shape
        group_prompts, group_mask, active, width = self._gather_prompts(prompts, mask)
        with self.generation_form() as model, self.backend.generation_context(model):
            seq = self.decode(model, group_prompts, group_mask, active=active)
        if self.release_cache or self.unpin:
            self._release_cache()
        start = self.tp.index * width
        mine = seq[start : start + rows, group_prompts.size(1) - length :]
        if self.rollout_logprobs is not None:
            self.rollout_logprobs = self.rollout_logprobs[start : start + rows]
        return pad_answers(mine, length, self.config, self.backend)

    def _gather_prompts(self, prompts: torch.Tensor, mask: torch.Tensor):
        """The group's prompts, each rank's left-padded to the longest and its rows to the most
        (filler rows: one pad token, finished from the start); returns them with the active-row mask
        and the rows per rank."""
        sizes = torch.tensor([prompts.size(0), prompts.size(1)], device=prompts.device)
        everyone = [torch.zeros_like(sizes) for _ in range(self.tp.size)]
        dist.all_gather(everyone, sizes, group=self.tp.group)
        rows = max(int(s[0]) for s in everyone)
        length = max(int(s[1]) for s in everyone)
        pad = self.config.pad_token_id
        padded = self.backend.pad_to_static(prompts, 1, length, pad, left=True)
        padded_mask = self.backend.pad_to_static(mask, 1, length, 0, left=True)
        filler = rows - prompts.size(0)
        active = torch.ones(rows, dtype=torch.bool, device=prompts.device)
        if filler:
            padded = torch.cat([padded, padded.new_full((filler, length), pad)])
            extra_mask = padded_mask.new_zeros((filler, length))
            extra_mask[:, -1] = 1
            padded_mask = torch.cat([padded_mask, extra_mask])
            active[prompts.size(0) :] = False
        gathered = [torch.empty_like(padded) for _ in range(self.tp.size)]
        gathered_mask = [torch.empty_like(padded_mask) for _ in range(self.tp.size)]
        gathered_active = [torch.empty_like(active) for _ in range(self.tp.size)]
        dist.all_gather(gathered, padded.contiguous(), group=self.tp.group)
        dist.all_gather(gathered_mask, padded_mask.contiguous(), group=self.tp.group)
        dist.all_gather(gathered_active, active, group=self.tp.group)
        return torch.cat(gathered), torch.cat(gathered_mask), torch.cat(gathered_active), rows


def make_hybrid_engine(
    actor, backend: Accelerator, config: GenerationConfig, *, inference_tp_size: int = 1, **options
) -> HybridEngine:
    """The hybrid engine, tensor-parallel over groups of `inference_tp_size` ranks where AutoTP can
    shard the actor (else the whole-model engine, with one log line saying why)."""
    if inference_tp_size > 1:
        reason = tp_unsupported_reason(actor.module, inference_tp_size)
        if reason is None:
            return TensorParallelEngine(actor, backend, config, tp_size=inference_tp_size, **options)
        log.info("hybrid engine: --inference_tp_size %d falls back to 1: %s", inference_tp_size, reason)
    return HybridEngine(actor, backend, config, **options)
