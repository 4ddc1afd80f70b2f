"""Decode-step graphs per step-3 run on the CPU: the measured proxy for CUDA graphs.

    python training/e2e_rlhf.py --output-dir out                              # the tiny actor and reward model
    python benchmarks/bench_decode_graphs.py --e2e-output out --steps 12      # padded (today)
    python benchmarks/bench_decode_graphs.py --e2e-output out --steps 12 --unpadded   # each batch its own length

Runs step 3 in this process with `--enable_hybrid_engine --enable_device_graphs` on the CPU, where the
decode step is captured by `torch.compile(fullgraph=True, dynamic=False)` with a counting backend: every
compiled graph is one capture a CUDA run would record. `--unpadded` restores the old collator (each batch
padded only to its longest prompt, the last batch short), to show what made CUDA graphs stop.
Prints one JSON line: steps, distinct prompt shapes generated, compiled graphs, recompile-limit warnings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--e2e-output", required=True, help="the e2e demo's --output-dir (its actor and reward)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--max_prompt_seq_len", type=int, default=48)
    p.add_argument("--bucket_lengths", type=int, nargs="*", default=None)
    p.add_argument("--unpadded", action="store_true", help="the old collator: no padding for device graphs")
    args = p.parse_args(argv)

    import torch
    from conftest import tiny_step3_argv
    from torch._dynamo.testing import CompileCounter

    import accel
    from accel.cpu import CpuAccelerator, describe_cpu
    from dschat_hal.rlhf.generation.engine import HybridEngine
    from training.step3_rlhf_finetuning.main import main as step3

    counter = CompileCounter()
    CpuAccelerator.graph_compiler = counter
    if args.unpadded:
        accel.Accelerator.static_generation_shapes = property(lambda self: False)
    shapes: set[tuple[int, ...]] = set()
    generate = HybridEngine.generate

    def recording_generate(self, prompts, mask):
        shapes.add(tuple(prompts.shape))
        return generate(self, prompts, mask)

    HybridEngine.generate = recording_generate
    warnings = Warnings()
    logging.getLogger("torch._dynamo").addHandler(warnings)
    buckets = ["--bucket_lengths", *map(str, args.bucket_lengths)] if args.bucket_lengths else []
    failure = None
    with tempfile.TemporaryDirectory() as tmp:
        argv3 = [
            *tiny_step3_argv(Path(args.e2e_output), Path(tmp), prompt=args.max_prompt_seq_len),
            *("--enable_hybrid_engine", "--enable_device_graphs", "--quiet", "--output_dir", ""),
            *("--enable_test_mode", "--test_stop_step", str(args.steps), *buckets),
        ]
        try:
            step3(argv3)
        except torch._dynamo.exc.FailOnRecompileLimitHit as err:  # fullgraph=True: the limit is an error
            failure = str(err).splitlines()[0]
    result = {
        "steps": args.steps,
        "padded": not args.unpadded,
        "prompt_shapes": len(shapes),
        "compiled_graphs": counter.frame_count,
        "recompile_limit_warnings": sum("recompile_limit" in m for m in warnings.messages),
        "failure": failure,
        "cpu": describe_cpu(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
