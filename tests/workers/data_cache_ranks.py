"""Run under `torch.distributed.run --nproc_per_node 2`: two ranks share one data cache.

Rank 0 builds it while rank 1 waits; then rank 0 damages a file of it, and the next load has rank 0
rebuild it before rank 1 reads. Writes DIR/rank{N}.json (DIR: the first argument): the sizes each
load saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dschat_hal.data import DataSpec, load_or_build  # noqa: E402
from dschat_hal.models import load_tokenizer  # noqa: E402


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = load_tokenizer("tiny-opt")
    spec = DataSpec(["local/jsonfile"], phase=2, max_seq_len=64)
    sizes = []
    train, evaluation, _ = load_or_build(spec, tokenizer, str(out / "cache"))
    sizes.append([len(train), len(evaluation), train[0]["chosen"][:4]])
    dist.barrier()
    if rank == 0:
        for arrow in (out / "cache").glob("step2_*/train/*.arrow"):
            arrow.write_bytes(b"damaged")
    dist.barrier()
    train, evaluation, _ = load_or_build(spec, tokenizer, str(out / "cache"))
    sizes.append([len(train), len(evaluation), train[0]["chosen"][:4]])
    (out / f"rank{rank}.json").write_text(json.dumps(sizes))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main(Path(sys.argv[1]))
