"""Data preparation, old path vs new, on one generated prompt/chosen/rejected file (step 2 pairs).

    python benchmarks/bench_data.py [--rows 100000] [--workers 2] [--old-rev b916b51] [--format json|jsonl|parquet]

The old path is the pipeline of git revision `--old-rev` (a pickle of Python lists, built row by
row), unpacked into a temporary directory; the new one is this tree's (datasets.map into an Arrow
cache). Each measurement runs in a fresh process: preparation wall and CPU time (the process and
its tokenising workers) and peak RSS, then a reload from the cache: time, RSS growth and peak RSS.
A tenth-size file shows whether reload memory grows with the data. `datasets` is imported before
the RSS baseline in both paths, so its import (~90 MB) counts as neither's data. Prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


KEYS = ("prompt", "chosen", "rejected")


def peak_rss_mb() -> float:
    """This process's peak RSS since it started (VmHWM: unlike ru_maxrss, not carried over from the
    parent through fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def write_rows(path: Path, rows: int, lines: bool = False, seed: int = 0) -> None:
    """`rows` prompt/chosen/rejected rows of about 1.7 kB each: a JSON list (or JSON lines; parquet
    for a .parquet path, as a hub snapshot holds them)."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        json_lines = path.with_suffix(".jsonl")
        write_rows(json_lines, rows, lines=True, seed=seed)
        with json_lines.open() as lines_in, pq.ParquetWriter(path, pa.schema([(k, pa.string()) for k in KEYS])) as out:
            while batch := [json.loads(line) for line in itertools.islice(lines_in, 5000)]:
                out.write_table(pa.Table.from_pylist(batch))  # in batches: this process stays small
        json_lines.unlink()
        return
    rng = random.Random(seed)
    words = sorted(set((ROOT / "dschat_hal/assets/data/train.json").read_text().replace('"', " ").split()))

    def text(n: int) -> str:
        return " ".join(rng.choices(words, k=n))

    with path.open("w") as out:
        out.write("" if lines else "[\n")
        for i in range(rows):
            row = {"prompt": f"Human: {text(60)} Assistant:", "chosen": " " + text(110), "rejected": " " + text(90)}
            out.write(json.dumps(row) + ("\n" if lines or i == rows - 1 else ",\n"))
        out.write("" if lines else "]\n")


def child(args: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line."""
    import datasets  # noqa: F401  (before the baseline in both paths: its import is not data)

    from dschat_hal.data import DataSpec, load_or_build
    from dschat_hal.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-opt")
    spec = DataSpec([args.data], phase=2, max_seq_len=512)
    before, cpu_before = rss_mb(), cpu_seconds()
    started = time.perf_counter()
    kwargs = {"num_proc": args.workers} if args.child == "new" else {}
    train, evaluation, _ = load_or_build(spec, tokenizer, args.cache, **kwargs)
    sample = train[len(train) // 2]  # one read, as a loader would
    seconds = time.perf_counter() - started
    assert sample["chosen"] and len(train) > 0
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds() - cpu_before,
        "rss_before_mb": before,
        "rss_after_mb": rss_mb(),
        "peak_mb": peak_rss_mb(),
        "workers_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "train": len(train),
        "eval": len(evaluation),
    }
    print("RESULT " + json.dumps(result), flush=True)


def run(path: str, tree: Path, data: Path, cache: Path, workers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", path, "--data", str(data), "--cache", str(cache)]
    done = subprocess.run([*cmd, "--workers", str(workers)], env=env, capture_output=True, text=True, cwd=tree)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{path} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=2, help="--preprocessing_num_workers of the new path")
    p.add_argument("--old-rev", default="b916b51", help="git revision with the old pipeline")
    p.add_argument("--format", default="json", choices=["json", "jsonl", "parquet"], help="file the rows are in")
    p.add_argument("--child", choices=["old", "new"], default=None)
    p.add_argument("--data")
    p.add_argument("--cache")
    args = p.parse_args()
    if args.child:
        return child(args)
    suffix = f".{args.format}"
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        old_tree = tmp / "old"
        old_tree.mkdir()
        archive = subprocess.run(["git", "archive", args.old_rev, "accel", "dschat_hal"], cwd=ROOT, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
        sizes = {"full": args.rows, "tenth": args.rows // 10}
        files = {}
        for name, rows in sizes.items():
            files[name] = tmp / f"rows_{name}" / f"train{suffix}"
            files[name].parent.mkdir()
            write_rows(files[name], rows, lines=args.format == "jsonl")
        mb = files["full"].stat().st_size / 2**20
        print(f"{args.rows} rows, {mb:.0f} MB of {suffix}; step 2 pairs, tiny tokenizer, max_seq_len 512", flush=True)
        rows = []
        for path, tree in (("old", old_tree), ("new", ROOT)):
            for name in ("full", "tenth"):
                cache = tmp / f"cache_{path}_{name}"
                workers = args.workers if path == "new" else 1
                build = run(path, tree, files[name], cache, workers)
                reload = run(path, tree, files[name], cache, workers)
                rows.append((path, sizes[name], build, reload))
                print(f"  {path} {sizes[name]} rows done", flush=True)
    print(
        "\n| path | rows | prepare wall (s) | prepare CPU (s) | prepare peak RSS, main / workers (MB) "
        "| RSS before (MB) | cached reload (s) | reload RSS growth (MB) | reload peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for path, n, build, reload in rows:
        print(
            f"| {path} | {n} | {build['seconds']:.1f} | {build['cpu_seconds']:.1f} "
            f"| {build['peak_mb']:.0f} / {build['workers_peak_mb']:.0f} | {build['rss_before_mb']:.0f} "
            f"| {reload['seconds']:.2f} | {reload['rss_after_mb'] - reload['rss_before_mb']:.0f} "
            f"| {reload['peak_mb']:.0f} |"
        )
    from accel.cpu import describe_cpu

    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs ({describe_cpu()})")


if __name__ == "__main__":
    main()
