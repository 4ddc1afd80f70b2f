"""Intel Gaudi (HPU) backend. `habana_frameworks` is imported lazily: it exists only in Gaudi images.

Lazy mode (`PT_HPU_LAZY_MODE=1`, the default here) accumulates a graph until `mark_step`; graphs are
compiled per shape, so this backend asks callers for static shapes. When `habana_frameworks`
declares itself a test double (`IS_TEST_FAKE`), tensors stay on the CPU and collectives use gloo,
so the HPU code paths run in CPU tests; every hardware answer (hccl, bf16, fused AdamW) is unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from accel.base import Accelerator

log = logging.getLogger(__name__)

# Environment a Gaudi user would set; the backend sets the defaults it needs before the import.
# PT_HPU_RECIPE_CACHE_CONFIG (a compiled-graph cache path) is left to the user (README).
HPU_ENV_DEFAULTS = {
    "PT_HPU_LAZY_MODE": "1",  # lazy graph mode, mark_step-driven
    "PT_HPU_ENABLE_LAZY_COLLECTIVES": "true",  # needed by ZeRO-3 / tensor parallelism in lazy mode
}


def _habana(submodule: str = "") -> Any:
    name = "habana_frameworks" + (f".{submodule}" if submodule else "")
    return importlib.import_module(name)


class HpuAccelerator(Accelerator):
    name = "hpu"
    graph_kind = "HPU graphs"
    dist_backend = "hccl"

    def __init__(self, local_rank: int | None = None) -> None:
        for key, value in HPU_ENV_DEFAULTS.items():
            if key not in os.environ:
                os.environ[key] = value
                log.info("accel/hpu: %s=%s set (override it in the environment)", key, value)
        super().__init__(local_rank)
        _habana("torch")  # registers the hpu_backend compiler and the device
        self._core = _habana("torch.core")
        self._hpu = _habana("torch.hpu")
        self.simulated = bool(getattr(_habana(), "IS_TEST_FAKE", False))
        self.lazy_mode = os.environ.get("PT_HPU_LAZY_MODE", "1") == "1"
        self.mark_step_calls = 0
        self.gaudi_generate = self._adapt_transformers()

    @classmethod
    def is_available(cls) -> bool:
        try:
            return bool(_habana("torch.hpu").is_available())
        except ImportError:
            return False

    @classmethod
    def unavailable_reason(cls) -> str:
        return "HPU requested but habana_frameworks is not importable; run inside a Gaudi image or use --device cpu"

    @staticmethod
    def _adapt_transformers() -> bool:
        """Apply optimum-habana's Gaudi model patches once, when it is installed, and its
        activation-checkpointing function (HabanaAI's DeepSpeed-Chat swaps it in for
        `torch.utils.checkpoint.checkpoint`, which the models' gradient checkpointing calls)."""
        try:
            from optimum.habana.transformers.modeling_utils import adapt_transformers_to_gaudi
        except ImportError:
            return False
        adapt_transformers_to_gaudi()
        try:
            from optimum.habana.transformers import gradient_checkpointing
        except ImportError:
            return True
        import torch.utils.checkpoint

        torch.utils.checkpoint.checkpoint = gradient_checkpointing.checkpoint
        return True

    def generate_kwargs(self) -> dict[str, Any]:
        """optimum-habana's `generate` (when it patched transformers) runs lazy mode per token and
        honours EOS only when told, as HabanaAI's fork calls it."""
        if not self.gaudi_generate:
            return {}
        return {"lazy_mode": self.lazy_mode, "ignore_eos": False}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.simulated else torch.device("hpu", self.local_rank)

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

    def capture_decode_step(self, step: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """An HPU graph of the decode step only: `wrap_in_hpu_graph` replaces the module's forward for
        good, so it is never applied to a module that trains."""
        if not self.use_graphs:
            return step
        log.info("accel/hpu: decode step captured in an HPU graph")
        return self._hpu.wrap_in_hpu_graph(step)

    @contextlib.contextmanager
    def generation_context(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Flush the training graph before generating and the generation graph after."""
        self.mark_step()
        try:
            yield model
        finally:
            self.mark_step()
