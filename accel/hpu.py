"""Intel Gaudi (HPU) backend. `habana_frameworks` is imported lazily: it exists only in Gaudi images.

Lazy mode (`PT_HPU_LAZY_MODE=1`, the default here) accumulates a graph until `mark_step`; graphs are
compiled per shape, so this backend asks callers for static shapes. The bridge fixes its mode when it
is imported: `accel/__init__` sets the defaults before torch loads, and the backend asks the runtime
(`habana_frameworks.torch.utils.internal.is_lazy`) which mode it is in rather than the environment. When `habana_frameworks`
declares itself a test double (`IS_TEST_FAKE`), tensors stay on the CPU and collectives use gloo,
so the HPU code paths run in CPU tests; every hardware answer (hccl, bf16, fused AdamW) is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from accel._hpu_env import HPU_ENV_DEFAULTS, set_hpu_env_defaults
from accel.base import Accelerator

log = logging.getLogger(__name__)

# PT_HPU_RECIPE_CACHE_CONFIG (a compiled-graph cache path) is left to the user (docs/hardware.md).


def _habana(submodule: str = "") -> Any:
    name = "habana_frameworks" + (f".{submodule}" if submodule else "")
    return importlib.import_module(name)


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


class HpuAccelerator(Accelerator):
    name = "hpu"
    graph_kind = "HPU graphs"
    dist_backend = "hccl"

    def __init__(self, local_rank: int | None = None) -> None:
        super().__init__(local_rank)
        self._ensure_env_before_bridge()
        _habana("torch")  # registers the hpu_backend compiler and the device
        self._core = _habana("torch.core")
        self._hpu = _habana("torch.hpu")
        self.simulated = bool(getattr(_habana(), "IS_TEST_FAKE", False))
        self.lazy_mode = self._runtime_is_lazy()
        self.mark_step_calls = 0
        self.graph_counts = {"captures": 0, "replays": 0}
        self._graphs_refusal_logged = False
        self.gaudi_generate = self._adapt_transformers(self.lazy_mode)

    @staticmethod
    def _ensure_env_before_bridge() -> None:
        """The defaults, if `accel/__init__` could not know the HPU would be used; they only take effect
        while the bridge is not imported yet."""
        for key in set_hpu_env_defaults():
            log.info("accel/hpu: %s=%s set (override it in the environment)", key, HPU_ENV_DEFAULTS[key])

    @staticmethod
    def _runtime_is_lazy() -> bool:
        """The mode the bridge is in (fixed when it was imported), not what the environment says now."""
        try:
            is_lazy = _habana("torch.utils.internal").is_lazy
        except (ImportError, AttributeError):  # a bridge without the query: its mode follows the variable
            return os.environ.get("PT_HPU_LAZY_MODE", "1") == "1"
        lazy = bool(is_lazy())
        wanted = os.environ.get("PT_HPU_LAZY_MODE", "1") == "1"
        if lazy != wanted:
            log.warning(
                "accel/hpu: the Habana bridge runs in %s mode but PT_HPU_LAZY_MODE=%s: it was imported before the "
                "variable was set; set it before starting Python",
                "lazy" if lazy else "eager",
                os.environ.get("PT_HPU_LAZY_MODE"),
            )
        return lazy

    @classmethod
    def is_available(cls) -> bool:
        if importlib.util.find_spec("habana_frameworks") is None:
            return False  # no Gaudi image: no HPU variables set either
        cls._ensure_env_before_bridge()  # the first import of the bridge, where accel/__init__ could not know
        try:
            return bool(_habana("torch.hpu").is_available())
        except ImportError:
            return False

    @classmethod
    def unavailable_reason(cls) -> str:
        return "HPU requested but habana_frameworks is not importable; run inside a Gaudi image or use --device cpu"

    def _adapt_transformers(self, lazy_mode: bool) -> bool:
        """Apply optimum-habana's Gaudi model patches once, and in lazy mode its activation-checkpointing
        function. transformers binds `checkpoint` into `modeling_utils` when it is imported, so both
        names are replaced, as optimum-habana's trainer does. A missing or broken optimum-habana is one
        warning line naming the exception (never a silent fallback): at import it raises ImportError
        when absent, and others when broken (IndexError when `pip list` shows no habana-torch-plugin)."""
        self.optimum_habana_version: str | None = None
        self.optimum_habana_problem: str | None = None
        try:
            from optimum.habana.transformers.modeling_utils import adapt_transformers_to_gaudi

            adapt_transformers_to_gaudi()
            _fix_opt_decode_positions()
        except Exception as err:  # noqa: BLE001  (any failure of the package is reported, not raised)
            detail = (str(err).strip().splitlines() or [""])[0]
            self.optimum_habana_problem = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
            log.warning(
                "accel/hpu: WARNING: running WITHOUT optimum-habana (%s): models are plain transformers, "
                "without Gaudi's optimised classes; install it with `pip install -r requirements-hpu.txt` "
                "(example_scripts/validate_gaudi.sh checks it)",
                self.optimum_habana_problem,
            )
            return False
        self.optimum_habana_version = _distribution_version("optimum-habana")
        if not lazy_mode:
            return True
        import torch.utils.checkpoint
        import transformers.modeling_utils
        from optimum.habana.transformers import gradient_checkpointing

        torch.utils.checkpoint.checkpoint = gradient_checkpointing.checkpoint
        transformers.modeling_utils.checkpoint = gradient_checkpointing.checkpoint
        return True

    def runtime_notes(self) -> str:
        if self.gaudi_generate:
            return f"optimum-habana {self.optimum_habana_version or '(version unknown)'}"
        return f"WITHOUT optimum-habana ({self.optimum_habana_problem})"

    def generate_kwargs(self, graphs: bool = False) -> dict[str, Any]:
        """optimum-habana's `generate` (when it patched transformers) runs lazy mode per token and
        honours EOS only when told, as HabanaAI's fork calls it. `graphs` (the forward is in HPU graphs):
        `hpu_graphs`, and `limit_hpu_graphs`, which runs the prompt's forward outside the graph
        (`bypass_hpu_graphs`), so each shape bucket captures one graph: the per-token decode step."""
        if not self.gaudi_generate:
            return {}
        kwargs: dict[str, Any] = {"lazy_mode": self.lazy_mode, "ignore_eos": False}
        if graphs:
            kwargs |= {"hpu_graphs": True, "limit_hpu_graphs": True}
        return kwargs

    def capture_generate_forward(self, model: torch.nn.Module) -> Callable[..., Any] | None:
        """optimum-habana's patched models decode in their own `generate`: their forward, wrapped by
        `wrap_in_hpu_graph_func` (one graph per input shape), stands in for `model.forward` during
        generation only, as HabanaAI's DeepSpeed-Chat fork does; training forwards never go through it
        (`wrap_in_hpu_graph` would replace the training module's forward for good)."""
        if not self.use_graphs or not self.gaudi_generate or not self._graphs_allowed():
            return None
        log.info("accel/hpu: %s's generation forward captured in HPU graphs (one per shape)", type(model).__name__)
        return self._counted(self._hpu.wrap_in_hpu_graph_func(model.forward))

    def _counted(self, graphed: Callable[..., Any]) -> Callable[..., Any]:
        """`graphed`, its captures and replays counted in `graph_counts` as the bridge makes them: a graph
        per input signature (tensor shapes and dtypes, other arguments by value or identity), none for a
        call with `bypass_hpu_graphs`."""
        seen: set = set()
        counts = self.graph_counts

        @functools.wraps(graphed)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not kwargs.get("bypass_hpu_graphs"):
                key = _graph_key((args, kwargs))
                counts["replays" if key in seen else "captures"] += 1
                seen.add(key)
            return graphed(*args, **kwargs)

        return call

    @property
    def graphs_by_default(self) -> bool:
        """Lazy mode: step-3 generation runs in HPU graphs unless `--disable_hpu_graphs` (as HabanaAI's fork
        with `--enable_hpu_graphs`); eager mode has no HPU graphs."""
        return self.lazy_mode

    def _graphs_allowed(self) -> bool:
        """HPU graphs need lazy mode (optimum-habana refuses `hpu_graphs` without it too); said once."""
        if self.lazy_mode:
            return True
        if not self._graphs_refusal_logged:
            log.info("accel/hpu: HPU graphs need lazy mode (PT_HPU_LAZY_MODE=1); eager mode decodes uncaptured")
            self._graphs_refusal_logged = True
        return False

    @property
    def device(self) -> torch.device:
        """ "hpu" without an index: the bridge binds each process to its card from the launcher's
        environment, and DeepSpeed's HPU accelerator, accelerate (`torch.hpu.current_device()`) and
        optimum-habana (which dropped "hpu:X" strings as not fully supported) all place on plain "hpu"."""
        return torch.device("cpu") if self.simulated else torch.device("hpu")

    def comm_backend(self) -> str:
        return "gloo" if self.simulated else self.dist_backend

    @property
    def ds_name(self) -> str:
        return "cpu" if self.simulated else self.name

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Eager mode (PT_HPU_LAZY_MODE=0): compile the forward with the HPU dynamo backend."""
        if self.lazy_mode:
            return model
        log.info("accel/hpu: eager mode: torch.compile(backend='hpu_backend') on %s", type(model).__name__)
        model.compile(backend="hpu_backend")
        return model

    def zero_overrides(self, stage: int) -> dict[str, Any]:
        """HabanaAI's recipe: no overlapped or reduce-scatter gradient reduction; ZeRO-1 without
        contiguous gradient buffers."""
        overrides: dict[str, Any] = {"overlap_comm": False, "reduce_scatter": False}
        if stage == 1:
            overrides["contiguous_gradients"] = False
        return overrides

    def device_count(self) -> int:
        return int(self._hpu.device_count())

    def mark_step(self) -> None:
        if self.lazy_mode:
            self.mark_step_calls += 1
            self._core.mark_step()

    @property
    def wants_static_shapes(self) -> bool:
        return True

    def optimizer_class(self, offload: bool = False, fused: bool = True) -> type[torch.optim.Optimizer]:
        from accel._op_builds import prepare_op_builds

        prepare_op_builds()  # DeepSpeed's Adam ops are built and loaded by torch's JIT
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam
        if fused:
            return _habana("torch.hpex.optimizers").FusedAdamW
        return torch.optim.AdamW

    def compute_fp32_loss(self, model_type: str, user_flag: bool | None = None) -> bool:
        if user_flag is not None:
            return user_flag
        # HabanaAI's scripts compute bloom's and llama's losses in fp32 (bf16 losses diverge on Gaudi)
        return model_type in ("bloom", "llama")

    @property
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def manual_seed(self, seed: int) -> None:
        super().manual_seed(seed)
        random = getattr(self._hpu, "random", None)
        if random is not None and hasattr(random, "manual_seed_all"):
            random.manual_seed_all(seed)

    def synchronize(self) -> None:
        self._hpu.synchronize()

    def memory_stats(self) -> dict[str, int]:
        return {"allocated": int(self._hpu.memory_allocated()), "peak": int(self._hpu.max_memory_allocated())}

    def empty_cache(self) -> None:
        """The HPU allocator keeps its pool; nothing to release."""

    def available_memory(self) -> int | None:
        stats = getattr(self._hpu, "mem_get_info", None)
        return int(stats()[0]) if stats is not None and not self.simulated else super().available_memory()

    @property
    def memory_is_host_memory(self) -> bool:
        """Simulated (the test fake): tensors live in host memory, shared by the node's ranks."""
        return self.simulated

    def capture_decode_step(self, step: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """An HPU graph of the decode step only: `wrap_in_hpu_graph` replaces the module's forward for
        good, so it is never applied to a module that trains."""
        if not self.use_graphs or not self._graphs_allowed():
            return step
        log.info("accel/hpu: decode step captured in an HPU graph")
        graphed = self._hpu.wrap_in_hpu_graph(step)
        graphed.forward = self._counted(graphed.forward)
        return graphed

    @contextlib.contextmanager
    def generation_context(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Flush the training graph before generating and the generation graph after."""
        self.mark_step()
        try:
            yield model
        finally:
            self.mark_step()


def _graph_key(value: Any) -> Any:
    """What tells one HPU graph from another in a call's arguments (as the bridge's `input_hash`)."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_graph_key(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _graph_key(v)) for k, v in value.items())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return (type(value).__name__, id(value))


def _fix_opt_decode_positions() -> None:
    """optimum-habana 1.21's `GaudiOPTLearnedPositionalEmbedding` embeds a decode step's position as
    `token_idx + offset`: one past the token's index and blind to left padding, so OPT's tokens differ
    from transformers' from the first decode step on. Its forward is replaced by transformers' rule
    (positions count the attended tokens, `cumsum(mask) - 1`), read at the token's index `token_idx - 1`
    in optimum-habana's static-shape decode, and at the last positions otherwise."""
    from optimum.habana.transformers.models.opt import modeling_opt as gaudi_opt

    def forward(
        self: torch.nn.Embedding,
        attention_mask: torch.Tensor,
        past_key_values_length: int = 0,
        position_ids: torch.Tensor | None = None,
        token_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mask = attention_mask.long()
        positions = torch.cumsum(mask, dim=1) * mask - 1
        if past_key_values_length and token_idx is not None:
            positions = positions.index_select(1, token_idx.reshape(-1) - 1)
        elif past_key_values_length:
            positions = positions[:, past_key_values_length:]
        return torch.nn.Embedding.forward(self, positions + self.offset)

    gaudi_opt.GaudiOPTLearnedPositionalEmbedding.forward = forward
