"""Memory plan: the peak bytes per rank of each phase of steps 1-3, from the model configs alone.

No weights are read: parameter counts come from building each model on the meta device. What is counted, per rank:

- training states (actor, critic, step-1/2 model): parameters, gradients, fp32 master weights,
  fp32 gradients and Adam's two moments, split by the ZeRO stage as DeepSpeed splits them (its
  own estimators use the same accounting: `tests/test_memory_plan.py` holds them equal), with
  `--offload` moving the optimizer's part (ZeRO-3: the parameters too) to host memory;
- frozen models (reference, reward, EMA): their weights in the training dtype (ZeRO-3: 1/N), the
  reference and reward where the run's decisions (`dschat_hal.decisions`) place them (replicated where they fit);
- activations kept for the backward pass (per layer and token: the inputs of every matmul, norm and
  activation function; with gradient checkpointing one hidden state per layer plus one layer
  recomputed), the logits and the loss's copies of them;
- step 3's hybrid engine: its inference copy of the actor (ZeRO-3 only, 1/T of the layers with
  `--inference_tp_size T`), the static KV cache, and the gathered layer group while refilling.

On the CPU the "device" is host memory shared by the node's ranks (each planned with its share of what
is available: `accel`'s `rank_memory`, over `--num_devices` or the launcher's local ranks), and a process also holds the
interpreter, torch, DeepSpeed, transformers and the data: a measured baseline (`CPU_BASELINE_BYTES`)
is added there. `benchmarks/bench_memory.py` compares the plan with measured peaks (VmHWM).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from dschat_hal.decisions import RunDecisions
from dschat_hal.memory_plan.estimates import layer_bytes, training_activations, training_states
from dschat_hal.memory_plan.fixes import find_fix
from dschat_hal.memory_plan.phases import CPU_BASELINE_BYTES, FIT_FRACTION, GiB, MiB, Phase, Plan, build, decide_for
from dschat_hal.memory_plan.shapes import Shape, model_shape

if TYPE_CHECKING:
    import torch

    from dschat_hal.configs import DPOStepConfig, HardwareConfig, PlanConfig, Step1Config, Step2Config, Step3Config

    StepConfig = Step1Config | Step2Config | DPOStepConfig | Step3Config

__all__ = [
    "CPU_BASELINE_BYTES",
    "FIT_FRACTION",
    "Phase",
    "Plan",
    "Shape",
    "build",
    "check",
    "decide",
    "decide_for",
    "dry_run",
    "find_fix",
    "layer_bytes",
    "model_shape",
    "parse_bytes",
    "plan_for",
    "render",
    "summary",
    "training_activations",
    "training_states",
]


_SIZE = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?:([KMGT])(i?B)?|(B))?\s*$", re.IGNORECASE)
SIZE_FORM = "a positive size with its unit, e.g. 24GiB, 80GB or 512MiB"


def parse_bytes(text: str, flag: str = "--device_memory") -> float:
    """'40GiB', '40G' (both 2^30 units), '40GB' (10^9), '512B'; a UserError naming `flag` for anything
    else: no unit, zero or negative, not a number."""
    from dschat_hal.errors import UserError

    match = _SIZE.match(text or "")
    if not match:
        raise UserError(f"{flag} {text!r} is not a size; write {SIZE_FORM}")
    number, unit, suffix, plain_bytes = match.groups()
    value = float(number)
    if value <= 0:
        raise UserError(f"{flag} {text!r} must be more than 0; write {SIZE_FORM}")
    if not unit and not plain_bytes:
        raise UserError(f"{flag} {text!r} has no unit; write {SIZE_FORM}")
    if plain_bytes:
        return value
    base = 1000 if (suffix or "").lower() == "b" else 1024
    return value * base ** ("KMGT".index(unit.upper()) + 1)


def resolve_device(hardware: HardwareConfig) -> str:
    import accel

    name = (hardware.device or "auto").lower()
    return accel.detect() if name == "auto" else name


def ranks_of(plan: PlanConfig) -> int:
    if plan.num_devices:
        return int(plan.num_devices)
    return int(os.environ.get("WORLD_SIZE", "1"))


def ranks_sharing(plan: PlanConfig, backend) -> int:
    """How many ranks share the memory `backend` reports: where it is host memory, the ranks planned
    for (`--num_devices`, all on this host) or else this job's processes on this host; 1 elsewhere."""
    from accel.base import local_process_count

    if backend is None or not backend.memory_is_host_memory:
        return 1
    return max(1, int(plan.num_devices or local_process_count()))


def device_memory(plan: PlanConfig, device: str, backend=None) -> float | None:
    """`--device_memory`, else what one rank gets of what the backend reports free (host memory: its
    share of what is available, with what this job's processes hold now), else unknown (None: the plan
    is printed but never refuses)."""
    if plan.device_memory is not None:
        return parse_bytes(plan.device_memory)
    if backend is None:
        return None
    sharing = ranks_sharing(plan, backend)
    free = backend.rank_memory(sharing)
    if free is None:
        return None
    if device == "cpu":  # the plan counts each process's baseline: what the running ones hold is theirs to share
        from accel.base import local_process_count

        free += _rss() * local_process_count() / sharing
    return float(free)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# ---- output ------------------------------------------------------------------------------------
def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= 0.1 * GiB else f"{value / MiB:.0f} MiB"


def render(plan: Plan) -> str:
    """The plan as text: one line per phase with its parts, the peak, and what does not fit."""
    memory = "unknown" if plan.device_memory is None else _gib(plan.device_memory)
    lines = [
        f"memory plan, step {plan.step}: {plan.ranks} rank(s) on {plan.device}, {memory} each, {plan.dtype}",
        *(f"  {n}" for n in plan.notes),
    ]
    for phase in plan.phases:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in phase.parts.items() if v)
        lines.append(f"  {phase.name:<10} {_gib(phase.total):>11} per rank  ({parts})")
    if plan.host and plan.device != "cpu":
        lines.append(f"  host (offloaded states) {_gib(plan.host)} per rank")
    lines.append(verdict(plan))
    return "\n".join(lines)


def verdict(plan: Plan) -> str:
    peak = plan.peak
    if plan.fits is None:
        return f"  peak {_gib(peak.total)} per rank ({peak.name}); device memory unknown: pass --device_memory to check"
    if plan.fits:
        return f"  fits: peak {_gib(peak.total)} per rank ({peak.name}) of {_gib(plan.budget)} usable"
    fix = " ".join(plan.fix) if plan.fix else None
    return (
        f"  does not fit: {peak.name} needs {_gib(peak.total)} per rank, {_gib(plan.budget)} usable "
        f"({FIT_FRACTION:.0%} of {_gib(plan.device_memory)}); "
        + (f"add {fix}" if fix else "no single flag here is enough: use more devices or a smaller model")
    )


def refusal(plan: Plan) -> str:
    """The one-line error a step raises before loading weights."""
    peak = plan.peak
    biggest = max(peak.parts.items(), key=lambda kv: kv[1])
    fix = f"add {' '.join(plan.fix)}" if plan.fix else "use more devices or a smaller model"
    return (
        f"the memory plan says step {plan.step} does not fit: its {peak.name} phase needs {_gib(peak.total)} per "
        f"rank ({biggest[0]} {_gib(biggest[1])}) and {_gib(plan.budget)} is usable; {fix}, or pass "
        "--skip_memory_check to try anyway (training/plan.py shows the whole plan)"
    )


def _where(config: StepConfig, backend=None) -> tuple[str, int, float | None]:
    """(device, ranks, device memory per rank) the plan is made for."""
    return _locate(config, backend)[:3]


def _locate(config: StepConfig, backend=None) -> tuple[str, int, float | None, int]:
    """`_where`, and how many ranks share the memory reported free (1: not shared, or given)."""
    if backend is not None:
        from dschat_hal.runtime import world_size

        device, ranks = backend.name, config.plan.num_devices or world_size()
    else:
        device, ranks = resolve_device(config.hardware), ranks_of(config.plan)
        backend = _probe(device)
    given = config.plan.device_memory is not None
    return (
        device,
        ranks,
        device_memory(config.plan, device, backend),
        1 if given else ranks_sharing(config.plan, backend),
    )


def run_dtype(config: StepConfig, backend=None) -> torch.dtype | None:
    """The dtype the run trains in: the backend's resolution of `--dtype` (None without a backend: the
    plan resolves `--dtype` itself)."""
    return None if backend is None else backend.resolve_dtype(config.hardware.dtype)


def plan_for(config: StepConfig, step: int, backend=None, decisions: RunDecisions | None = None) -> Plan:
    """The plan of `config` for `step`, with the fix when it does not fit; step 3 with `decisions`
    (default: decided here, as `decide` would)."""
    device, ranks, memory, sharing = _locate(config, backend)
    dtype = run_dtype(config, backend)
    plan = build(config, step, device, ranks, memory, decisions, dtype)
    if memory is not None and sharing > 1:
        plan.notes.append(f"host memory shared by the {sharing} ranks on this host: {_gib(memory)} each")
    if plan.fits is False:
        plan.fix = find_fix(config, plan, dtype=dtype)
    return plan


def decide(config: Step3Config, backend=None) -> RunDecisions:
    """Step 3's decisions (`dschat_hal.decisions`) for the device, ranks and memory the plan uses,
    rank 0's on every rank (each rank measures its own free memory, and ranks that partitioned
    differently would wait on each other's gathers for ever)."""
    from dschat_hal.runtime import rank0s

    return rank0s(decide_for(config, *_where(config, backend), run_dtype(config, backend)))


def _probe(device: str):
    """The backend of `device` for its free memory, without starting distributed (None if absent)."""
    import accel

    try:
        return accel.get(device)
    except accel.DeviceUnavailableError:
        return None


def dry_run(config: StepConfig, step: int) -> dict:
    """`--dry_run`: print the plan (rank 0) and return its numbers; nothing is loaded or written."""
    plan = plan_for(config, step)
    if int(os.environ.get("RANK", "0")) == 0:
        print(render(plan), flush=True)
    return summary(plan)


def check(config: StepConfig, step: int, backend, decisions: RunDecisions | None = None) -> None:
    """Before loading weights: refuse in one line (UserError) when the plan (step 3: with the run's
    `decisions`) cannot fit, unless `--skip_memory_check`; an unknown device memory never refuses."""
    from dschat_hal.errors import UserError

    if config.plan.skip_memory_check:
        return
    plan = plan_for(config, step, backend, decisions)
    if plan.fits is False:
        raise UserError(refusal(plan))


def summary(plan: Plan) -> dict:
    """The plan as JSON-able numbers (bytes)."""
    return {
        "step": plan.step,
        "fits": plan.fits,
        "peak_phase": plan.peak.name,
        "peak_bytes": plan.peak.total,
        "phases": {p.name: {"total": p.total, **p.parts} for p in plan.phases},
        "fix": plan.fix,
        "host_bytes": plan.host,
        "device_memory": plan.device_memory,
    }
