"""The demo's wall time and the OpenMP wait policy, measured side by side.

    python benchmarks/bench_startup.py [--old-rev b916b51] [--repeat 2]

1. A tiny training loop (40 steps of tiny OPT + a short greedy generation) in fresh processes with
   OMP_WAIT_POLICY=ACTIVE and PASSIVE (what `accel` now sets by default).
2. The README demo (`training/e2e_rlhf.py`) of revision `--old-rev` and of this tree, alternately.
Prints wall and CPU seconds with the load average, since shared cores change everything here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOOP = """
import os, time, torch
from dschat_hal.models.tiny import tiny_model
model = tiny_model("tiny-opt", 1024, seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 1000, (8, 96))
def step():
    model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad()
step()
wall, cpu = time.perf_counter(), time.process_time()
for _ in range(40):
    step()
with torch.no_grad():
    model.generate(x[:4, :32], max_new_tokens=32, do_sample=False, pad_token_id=0)
print(f"{time.perf_counter() - wall:.2f} {time.process_time() - cpu:.2f}")
"""


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{cmd} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-rev", default="b916b51")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    print("| what | wall (s) | CPU (s) | load average |\n|---|---|---|---|")
    for _ in range(args.repeat):
        for policy in ("ACTIVE", "PASSIVE"):
            env = dict(base, OMP_WAIT_POLICY=policy, PYTHONPATH=str(ROOT))
            _, out = timed([sys.executable, "-c", LOOP], env, ROOT)
            wall, cpu = out.split()[-2:]
            print(
                f"| training loop, OMP_WAIT_POLICY={policy} | {wall} | {cpu} | {os.getloadavg()[0]:.1f} |", flush=True
            )
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.old_rev], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        for _ in range(args.repeat):
            for name, tree in ((f"demo at {args.old_rev}", old), ("demo, this tree", ROOT)):
                out = Path(tmp) / "out"
                env = dict(base, PYTHONPATH=str(tree))
                usage = os.times()
                wall, _ = timed([sys.executable, "training/e2e_rlhf.py", "--output-dir", str(out)], env, tree)
                after = os.times()
                cpu = after.children_user + after.children_system - usage.children_user - usage.children_system
                print(f"| {name} | {wall:.1f} | {cpu:.1f} | {os.getloadavg()[0]:.1f} |", flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)


if __name__ == "__main__":
    main()
