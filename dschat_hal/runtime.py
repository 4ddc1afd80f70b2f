"""Process setup and the pieces every step shares: engines, optimizers, ranks, metrics."""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import accel
from accel import Accelerator
from dschat_hal.models.lora import convert_to_lora, only_optimize_lora

if TYPE_CHECKING:
    from dschat_hal.configs import HardwareConfig, LoggingConfig, OptimConfig, ScheduleConfig

log = logging.getLogger("dschat_hal")

NO_DECAY = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight", "ln_")


def setup(args: argparse.Namespace) -> Accelerator:
    """Choose the backend, initialise distributed, seed; quiet third-party logs (`start_backend`), then
    resolve the dtype into `args.dtype_resolved` and print the start-up lines."""
    from dschat_hal.configs import HardwareConfig, to_config

    backend = start_backend(
        to_config(args, HardwareConfig),
        device_graphs=getattr(args, "enable_device_graphs", False),
        verbose=getattr(args, "verbose", False),
    )
    args.dtype_resolved = backend.resolve_dtype(args.dtype)
    chosen = str(args.dtype_resolved).removeprefix("torch.")
    why = f"--dtype auto: {backend.default_dtype_reason()}" if args.dtype in (None, "auto") else f"--dtype {args.dtype}"
    notes = backend.runtime_notes()
    print_rank0(f"running on {backend.describe()} in {chosen} ({why}){'; ' + notes if notes else ''}")
    if getattr(args, "output_note", None):
        print_rank0(args.output_note)
    print_rank0(f"optimizer: {backend.describe_optimizer(offload=args.offload, fused=not args.no_fused_kernels)}")
    from dschat_hal.inert_flags import inert_flag_notes

    for note in inert_flag_notes(args, backend, world_size()):
        print_rank0(f"note: {note}")
    return backend


def start_backend(hardware: HardwareConfig, *, device_graphs: bool = False, verbose: bool = False) -> Accelerator:
    """The backend of `hardware.device`, distributed initialised and seeded; third-party logs quieted.
    `device_graphs`: step 3's generation in device graphs (`--enable_device_graphs`)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    silence_known_warnings()
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    backend = accel.get(hardware.device, local_rank=hardware.local_rank if hardware.local_rank >= 0 else None)
    if backend.reuse_freed_host_memory() is not None:  # until the step's main returns
        from dschat_hal.errors import on_exit

        on_exit(accel.release_host_memory)
    backend.set_buckets(hardware.bucket_lengths)
    backend.use_graphs = generation_graphs(backend, hardware, device_graphs)
    backend.optimizer_choice = hardware.optimizer
    if hardware.audit_shapes:
        backend.enable_shape_audit()
    init_distributed(backend)  # which first clears a stale op-build lock (accel/_op_builds.py)
    log_from_rank0(rank())
    _silence_deepspeed(verbose)
    _import_muon_uncompiled()
    freeze_startup_objects()
    backend.manual_seed(hardware.seed)
    return backend


def generation_graphs(backend: Accelerator, hardware: HardwareConfig, device_graphs: bool = False) -> bool:
    """Whether step-3 generation is captured in device graphs: when asked for (`--enable_hpu_graphs`,
    `device_graphs`: `--enable_device_graphs`), or by the backend's default (HPU lazy mode) unless
    `--disable_hpu_graphs`."""
    asked = hardware.enable_hpu_graphs or device_graphs
    return bool(asked or (backend.graphs_by_default and not hardware.disable_hpu_graphs))


class RankFilter(logging.Filter):
    """One rank's log filter: rank 0 logs everything; any other rank only errors, which name it, and
    records logged with `extra={"all_ranks": True}` (lines that concern that rank alone)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0 or getattr(record, "all_ranks", False):
            return True
        if record.levelno < logging.ERROR:
            return False
        if not getattr(record, "rank_named", False):
            record.msg, record.rank_named = f"rank {self.rank}: {record.msg}", True
        return True


def log_from_rank0(rank: int, handlers: list[logging.Handler] | None = None) -> None:
    """Under several processes only rank 0 logs (as upstream's `print_rank_0`), errors excepted:
    filter `handlers` (default: the root logger's, which every project logger reaches)."""
    for handler in logging.getLogger().handlers if handlers is None else handlers:
        for old in [f for f in handler.filters if isinstance(f, RankFilter)]:
            handler.removeFilter(old)
        handler.addFilter(RankFilter(rank))


def init_distributed(backend: Accelerator) -> None:
    """`backend.init_distributed()`, with a rendezvous port that another run holds said in one line."""
    from dschat_hal.errors import UserError

    try:
        backend.init_distributed()
    except Exception as err:
        if "EADDRINUSE" not in str(err) and "address already in use" not in str(err).lower():
            raise
        port = os.environ.get("MASTER_PORT", "the rendezvous port")
        raise UserError(
            f"port {port} (MASTER_PORT) is already in use, probably by another run; give the launcher a free "
            "port (deepspeed --master_port N, torchrun --master_port N, e2e_rlhf.py --master-port N)"
        ) from None


# Deprecations raised inside third-party code (DeepSpeed's ZeRO calls these torch collectives on
# every step): nothing a user can act on, dozens per ZeRO-3 run.
KNOWN_THIRD_PARTY_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.(_reduce_scatter_base|_all_gather_base)` is a private function"),
)


def silence_known_warnings() -> None:
    """Ignore the known third-party deprecation warnings (once per process, at start-up)."""
    for category, message in KNOWN_THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@functools.cache
def freeze_startup_objects() -> None:
    """Once per process, after the imports: keep the objects alive now out of the cyclic collector.

    They are ~400k, nearly all module state of torch, transformers and DeepSpeed; DeepSpeed calls
    `gc.collect()` at every engine start and memory report, 0.25 s each with them on 2 CPU cores.
    """
    gc.freeze()


def _import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer module with `torch.compile` as the identity.

    Every DeepSpeed optimizer start imports that module only to `isinstance`-check the client
    optimizer against its class; the import wraps three functions in `torch.compile`, which loads
    inductor (0.8-1.3 s per process on 2 CPU cores). This project never builds a Muon optimizer.
    """
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name in sys.modules or importlib.util.find_spec("deepspeed.runtime.zero.muon") is None:
        return  # imported already, or a DeepSpeed without Muon (older releases, Habana's fork)
    from deepspeed.runtime import compiler

    original = getattr(compiler, "compile", None)
    if original is None:
        return
    compiler.compile = lambda: lambda function: function
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    finally:
        compiler.compile = original


def _silence_deepspeed(verbose: bool = False) -> None:
    """DeepSpeed's info log and its memory reports (`see_memory_usage(..., force=True)`, printed by
    its bf16 optimizer at every start) off, unless --verbose."""
    from deepspeed.utils import logger as ds_logger

    if verbose:
        return
    ds_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _UntestedOptimizerCaution) for f in ds_logger.filters):
        ds_logger.addFilter(_UntestedOptimizerCaution())
    import deepspeed.runtime.utils as ds_utils

    report = ds_utils.see_memory_usage
    for module in list(sys.modules.values()):
        if (
            getattr(module, "__name__", "").startswith("deepspeed")
            and getattr(module, "see_memory_usage", None) is report
        ):
            module.see_memory_usage = _no_memory_report


class _UntestedOptimizerCaution(logging.Filter):
    """Drops DeepSpeed's "You are using ZeRO with an untested optimizer, proceed with caution": ZeRO
    is given torch's AdamW (or the device's fused Adam) on purpose (`zero_allow_untested_optimizer`),
    and the step's start-up lines name the optimizer instead (`Accelerator.describe_optimizer`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in str(record.msg)


def _no_memory_report(message: str, force: bool = False) -> None:
    """DeepSpeed's `see_memory_usage`, silenced."""


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def is_rank0() -> bool:
    return rank() == 0


def rank0s(value: Any) -> Any:
    """Rank 0's `value` on every rank (a decision each rank made from its own measurements, which
    must agree: ranks that differ in what they gather or when wait on each other for ever)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def print_rank0(*parts: Any) -> None:
    if is_rank0():
        write_line(" ".join(str(part) for part in parts))


def write_line(text: str, file: Any = None) -> None:
    """Print one log line; while a tqdm bar is on screen, through `tqdm.write`, which clears the
    bar, prints the line and redraws the bar below it (a plain print would tear the bar)."""
    tqdm_module = sys.modules.get("tqdm")  # a bar exists only if tqdm was imported
    bars = getattr(getattr(tqdm_module, "tqdm", None), "_instances", None)
    if bars:
        tqdm_module.tqdm.write(text, file=file or sys.stdout)
        (file or sys.stdout).flush()
    else:
        print(text, file=file, flush=True)


def apply_lora(
    model: nn.Module, dim: int, module_name: str, only_lora: bool, keep_trainable: tuple[str, ...] = ()
) -> nn.Module:
    """LoRA on the matching linear layers; with `only_lora`, everything else is frozen except the
    parameters named by a prefix in `keep_trainable`."""
    if dim > 0:
        count = convert_to_lora(model, module_name, dim)
        log.info("LoRA dim %d on %d linear layers matching %r", dim, count, module_name)
        if only_lora:
            only_optimize_lora(model, keep_trainable)
    return model


def param_groups(model: nn.Module, weight_decay: float, lora_lr: float) -> list[dict[str, Any]]:
    """AdamW groups: decayed weights, undecayed biases/norms, and LoRA factors with their own lr."""
    decay, no_decay, lora = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_right_weight" in name or "lora_left_weight" in name:
            lora.append(param)
        elif any(key in name.lower() for key in NO_DECAY):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": lora, "weight_decay": weight_decay, "lr": lora_lr},
    ]
    return [g for g in groups if g["params"]]


# Passed explicitly to every device's Adam(W): Habana's FusedAdamW defaults differ from torch's
# (eps 1e-6, weight decay 0.0), so the same flags must not mean different optimizers.
ADAM_BETAS = (0.9, 0.95)  # upstream DeepSpeed-Chat's
ADAM_EPS = 1e-8  # torch's and DeepSpeed's default


def deepspeed_engine(
    backend: Accelerator,
    model: nn.Module,
    *,
    dtype: torch.dtype,
    offload: bool,
    fused: bool,
    zero_hpz: bool,
    scheduler: str,
    warmup_steps: int,
    tensorboard_path: str | None,
    lr: float,
    weight_decay: float,
    lora_lr: float,
    stage: int,
    total_steps: int,
    micro_batch: int,
    gradient_checkpointing: bool,
    job_name: str,
    grad_accum: int,
    zero_extra: dict[str, Any] | None = None,
):
    """A training DeepSpeed engine of `model`: the backend's optimizer, `scheduler` over `total_steps`
    after `warmup_steps`, ZeRO `stage` (`zero_extra` adds entries to its section)."""
    import deepspeed
    from transformers import get_scheduler

    from dschat_hal.ds_config import hpz_entries, split_for_step, train_ds_config

    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # keeps checkpointed segments differentiable with frozen embeddings
        elif hasattr(model, "rwtransformer"):
            model.rwtransformer.enable_input_require_grads()
    config = train_ds_config(
        backend, dtype, stage, offload, micro_batch, grad_accum, world_size(), tensorboard_path, job_name
    )
    config["zero_optimization"].update(zero_extra or {})
    if zero_hpz:
        config["zero_optimization"].update(hpz_entries(backend, stage, world_size()))
    model = backend.prepare_model(model)
    optimizer_class = backend.optimizer_class(offload=offload, fused=fused)
    groups = param_groups(model, weight_decay, lora_lr)
    if stage in (1, 2) and not offload:  # offload keeps the fp32 gradients on the host: nothing to split
        groups = split_for_step(groups)
    optimizer = optimizer_class(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
    scheduler = get_scheduler(
        scheduler, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1)
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def engine_from_config(
    backend: Accelerator,
    model: nn.Module,
    optim: OptimConfig,
    schedule: ScheduleConfig,
    hardware: HardwareConfig,
    logging_config: LoggingConfig,
    *,
    dtype: torch.dtype,
    total_steps: int,
    micro_batch: int,
    job_name: str,
    grad_accum: int | None = None,
    zero_extra: dict[str, Any] | None = None,
):
    """`deepspeed_engine` configured by one trained model's optimiser config and the step's shared parts
    (`grad_accum` default: the schedule's gradient accumulation)."""
    if optim.learning_rate is None:  # a part built in Python without the step's default
        from dschat_hal.errors import UserError

        raise UserError(
            f"{job_name}: the optimiser config has no learning_rate: set one (OptimConfig(learning_rate=...)), or "
            "start from the step config's own part (dataclasses.replace(Step3Config(...).actor, ...))"
        )
    return deepspeed_engine(
        backend,
        model,
        dtype=dtype,
        offload=hardware.offload,
        fused=not hardware.no_fused_kernels,
        zero_hpz=hardware.zero_hpz_enabled,
        scheduler=schedule.lr_scheduler_type,
        warmup_steps=schedule.num_warmup_steps,
        tensorboard_path=logging_config.tensorboard_path if _tensorboard(logging_config) else None,
        lr=optim.learning_rate,
        weight_decay=optim.weight_decay,
        lora_lr=optim.lora_learning_rate,
        stage=optim.zero_stage,
        total_steps=total_steps,
        micro_batch=micro_batch,
        gradient_checkpointing=optim.gradient_checkpointing,
        job_name=job_name,
        grad_accum=grad_accum or schedule.gradient_accumulation_steps,
        zero_extra=zero_extra,
    )


def partitioned_load_config(
    backend: Accelerator, *, dtype: torch.dtype, stage: int, offload: bool, micro_batch: int, grad_accum: int
) -> dict | None:
    """The DeepSpeed config `from_pretrained` needs to partition weights while loading: None below ZeRO-3."""
    from dschat_hal.ds_config import train_ds_config

    if stage != 3:
        return None
    return train_ds_config(backend, dtype, stage, offload, micro_batch, grad_accum, world_size())


def frozen_engine(
    backend: Accelerator, model: nn.Module, *, dtype: torch.dtype, stage: int, offload: bool, micro_batch: int
):
    """A forward-only DeepSpeed engine of `model` in `dtype`, at ZeRO `stage`."""
    import deepspeed

    from dschat_hal.ds_config import eval_ds_config

    config = eval_ds_config(backend, dtype, stage, offload, micro_batch, world_size())
    engine, *_ = deepspeed.initialize(model=backend.prepare_model(model), config=config)
    engine.eval()
    return engine


def dataloader(dataset, collate, batch_size: int, seed: int, shuffle: bool = True):
    """A loader that gives each rank its own shard (deterministic for a seed). A device that wants
    static shapes never sees a smaller last batch (it is dropped)."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    import accel

    drop_last = accel.current().wants_static_shapes and len(dataset) >= batch_size * world_size()
    sampler = DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last)


def shape_counts(backend: Accelerator) -> dict[str, int] | None:
    """Distinct input shapes per model, when `--audit_shapes` is on."""
    if backend.shape_audit is None:
        return None
    return {model: len(shapes) for model, shapes in backend.shape_audit.items()}


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    value = value.detach().clone().float()
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(value)
        value /= world_size()
    return value


SUMMARY_FILE = "training_summary.json"


def write_summary(output_dir: str | None, summary: dict[str, Any]) -> None:
    """Write a step's final numbers beside its outputs (rank 0; atomic replace)."""
    import json

    if not output_dir or not is_rank0():
        return
    from dschat_hal.faults import disk_full_is_one_line

    path = os.path.join(output_dir, SUMMARY_FILE)
    with disk_full_is_one_line(path, SUMMARY_FILE, f"and the model in {output_dir} is complete"):
        os.makedirs(output_dir, exist_ok=True)
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(summary, f, indent=1, default=float)
            os.replace(path + ".tmp", path)
        finally:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")


class ScalarWriter:
    """Pipeline-level scalars, written by rank 0 only (a no-op when disabled): TensorBoard event files
    under `path/name`, or with `report_to="wandb"` a Weights & Biases run (its files under `path`)."""

    def __init__(
        self, path: str | None, name: str, report_to: str = "tensorboard", config: dict[str, Any] | None = None
    ) -> None:
        self.writer = None
        if path and is_rank0() and report_to == "wandb":
            from dschat_hal.monitor import WandbWriter

            self.writer = WandbWriter(name, path, config)
        elif path and is_rank0() and report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(path, name))

    @classmethod
    def for_run(cls, logging_config: LoggingConfig, name: str, flags: Mapping[str, Any]) -> ScalarWriter:
        """The writer `--report_to` (resolved: `resolve_report_to`) asks for, under `--tensorboard_path`;
        a wandb run records the run's resolved `flags` (those of plain values) as its config."""
        from dschat_hal.monitor import resolve_report_to

        report_to = resolve_report_to(logging_config).report_to  # as the command line resolves it
        config = {k: v for k, v in flags.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
        return cls(logging_config.tensorboard_path if report_to != "none" else None, name, report_to, config)

    def add(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        if hasattr(self.writer, "log"):  # wandb: one row per step
            self.writer.log({key: float(value) for key, value in values.items()}, step)
            return
        for key, value in values.items():
            self.writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _tensorboard(logging_config: LoggingConfig) -> bool:
    """Whether DeepSpeed's own monitor writes TensorBoard files: `--report_to` resolved says tensorboard."""
    from dschat_hal.monitor import resolve_report_to

    return resolve_report_to(logging_config).enable_tensorboard
