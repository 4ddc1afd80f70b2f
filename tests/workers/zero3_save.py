"""Run under `torch.distributed.run --nproc_per_node 2`: save ZeRO-3 partitioned models from rank 0.

For each KIND of "lm" and "reward", every rank loads DIR/KIND/source (a causal LM or a reward model
the test wrote) partitioned at load time, then saves it to DIR/KIND/saved with rank 0 writing.
Around each save a rank resets its peak resident memory (/proc/self/clear_refs) and records how far
it rose above the resident memory before. Writes DIR/rank{N}.json: per kind, that growth in bytes,
the model's and its largest parameter's bytes, and the bytes of the parameters the rank holds whole
(those under the persistence threshold).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import accel  # noqa: E402
from dschat_hal.ds_config import eval_ds_config  # noqa: E402
from dschat_hal.models import create_lm, create_reward_model, load_tokenizer, save_lm  # noqa: E402
from dschat_hal.runtime import frozen_engine, world_size  # noqa: E402


def status_kb(key: str) -> int:
    """A `Vm*` line of /proc/self/status, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def save_measured(backend, tokenizer, kind: str, directory: Path, rank: int) -> dict[str, int]:
    config = eval_ds_config(backend, torch.float32, 3, False, 1, world_size())
    create = create_lm if kind == "lm" else create_reward_model
    model = create(str(directory / "source"), tokenizer, config)
    module = frozen_engine(backend, model, dtype=torch.float32, stage=3, offload=False, micro_batch=1).module
    params = list(module.parameters())
    sizes = [p.ds_numel * p.element_size() for p in params]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_kb("VmRSS")
    if kind == "lm":
        save_lm(module, tokenizer, directory / "saved", is_writer=rank == 0)
    else:
        module.save(directory / "saved", tokenizer, is_writer=rank == 0)
    return {
        "growth": (status_kb("VmHWM") - before) * 1024,
        "model_bytes": sum(sizes),
        "largest_bytes": max(sizes),
        "held_bytes": sum(p.numel() * p.element_size() for p in params),
    }


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    backend = accel.get("cpu")
    backend.init_distributed()
    tokenizer = load_tokenizer("tiny-opt")
    result = {kind: save_measured(backend, tokenizer, kind, out / kind, rank) for kind in ("lm", "reward")}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
