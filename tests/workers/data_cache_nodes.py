"""One rank of a simulated two-node run: RANK and WORLD_SIZE from the environment, LOCAL_RANK 0 on
both "nodes", each node's disk a directory of its own.

Loads step 2's data twice: first from a node-local cache (DIR/node{N}/cache, N = the first argument
after DIR), then from one both nodes share (DIR/shared/cache), then node-locally without LOCAL_RANK.
Writes DIR/rank{R}.json: per load, the sizes and first tokens seen and the cache messages this rank
logged; for the last, "loaded" or the error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dschat_hal.data import DataSpec, load_or_build  # noqa: E402
from dschat_hal.errors import UserError  # noqa: E402
from dschat_hal.models import load_tokenizer  # noqa: E402


class Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main(out: Path, node: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    messages = Messages()
    pipeline_log = logging.getLogger("dschat_hal.data.pipeline")
    pipeline_log.addHandler(messages)
    pipeline_log.setLevel(logging.INFO)
    tokenizer = load_tokenizer("tiny-opt")
    spec = DataSpec(["local/jsonfile"], phase=2, max_seq_len=64)
    loads = {}
    for name, cache in (("node_local", out / f"node{node}" / "cache"), ("shared", out / "shared" / "cache")):
        messages.lines = []
        train, evaluation, _ = load_or_build(spec, tokenizer, str(cache))
        loads[name] = {"sizes": [len(train), len(evaluation)], "first": train[0]["chosen"][:4], "log": messages.lines}
        dist.barrier()
    # a launcher that sets no LOCAL_RANK: the other node's rank cannot tell it is its node's first
    os.environ.pop("LOCAL_RANK")
    try:
        load_or_build(spec, tokenizer, str(out / f"node{node}" / "unlabelled"))
        loads["unlabelled"] = "loaded"
    except UserError as err:
        loads["unlabelled"] = str(err)
    (out / f"rank{rank}.json").write_text(json.dumps(loads))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main(Path(sys.argv[1]), sys.argv[2])
