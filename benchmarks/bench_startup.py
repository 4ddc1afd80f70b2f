"""The demo's wall time and the OpenMP wait policy, measured side by side, quiet and on shared cores.

    python benchmarks/bench_startup.py [--repeat 2] [--load 3] [--old-rev b916b51]

Workloads, each in fresh processes:
  loop  a tiny training loop (40 steps of tiny OPT + a short greedy generation)
  demo  the README demo (`training/e2e_rlhf.py`, warm: the op build and data cache of an earlier run kept)
Wait policies (libgomp, torch's OpenMP runtime on Linux):
  passive      OMP_WAIT_POLICY=PASSIVE: threads sleep at once (what `accel` sets when the load
               average at start-up is at least the CPU count and you set neither variable)
  spin 30000   OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=30000: spin briefly, then sleep (what `accel`
               sets on idle cores)
  spin 300000  GOMP_SPINCOUNT=300000: libgomp's default when nothing is set
  active       OMP_WAIT_POLICY=ACTIVE: threads spin forever (loop only: the demo takes minutes on shared cores)
"Shared cores" runs `--load` busy-looping processes beside each measurement. `--old-rev` adds the demo
of an older revision (run with its own defaults). Prints wall and CPU seconds with the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
POLICIES = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 30000": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "30000"},
    "spin 300000": {"GOMP_SPINCOUNT": "300000"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
}
BUSY = "while True: pass"


def run(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds (the child and its children) of one command, and its stdout."""
    before = os.times()
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = os.times()
    if done.returncode:
        raise SystemExit(f"{cmd} failed:\n{done.stderr[-2000:]}")
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    return wall, cpu, done.stdout


@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """`count` processes that spin on the CPU for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(count)]
    try:
        time.sleep(1.0 if count else 0.0)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def row(what: str, policy: str, load: str, wall: float, cpu: float) -> None:
    print(f"| {what} | {policy} | {load} | {wall:.2f} | {cpu:.2f} | {os.getloadavg()[0]:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--load", type=int, default=3, help="busy processes for the shared-cores runs")
    p.add_argument("--old-rev", default=None, help="also time the demo of this revision")
    p.add_argument("--workloads", nargs="+", default=["loop", "demo"], choices=["loop", "demo"])
    args = p.parse_args()
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    from accel.cpu import describe_cpu

    print(f"{os.cpu_count()} CPUs ({describe_cpu()}); shared cores = {args.load} busy processes beside the run\n")
    print("| workload | wait policy | cores | wall (s) | CPU (s) | load average |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        trees = {"demo": ROOT}
        if args.old_rev:
            old = Path(tmp) / "old"
            old.mkdir()
            archive = subprocess.run(["git", "archive", args.old_rev], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
            trees[f"demo at {args.old_rev}"] = old
        out = Path(tmp) / "out"
        if "demo" in args.workloads:  # warm: the op build and the interpreter's caches
            run([sys.executable, "training/e2e_rlhf.py", "--output-dir", str(out)], dict(clean), ROOT)
        for load, busy in (("quiet", 0), ("shared", args.load)):
            with busy_cores(busy):
                for _ in range(args.repeat):
                    if "loop" in args.workloads:
                        for policy, env in POLICIES.items():
                            _, _, stdout = run(
                                [sys.executable, "-c", LOOP], clean | env | {"PYTHONPATH": str(ROOT)}, ROOT
                            )
                            wall, cpu = map(float, stdout.split()[-2:])
                            row("loop", policy, load, wall, cpu)
                    if "demo" not in args.workloads:
                        continue
                    for name, tree in trees.items():
                        policies = [p for p in POLICIES if p != "active"] if tree is ROOT else ["its default"]
                        for policy in policies:
                            env = clean | POLICIES.get(policy, {}) | {"PYTHONPATH": str(tree)}
                            subprocess.run(["rm", "-rf", str(out)], check=True)
                            cmd = [sys.executable, "training/e2e_rlhf.py", "--output-dir", str(out)]
                            wall, cpu, _ = run(cmd, env, tree)
                            row(name, policy, load, wall, cpu)


if __name__ == "__main__":
    main()
