"""Step 3 side by side with upstream DeepSpeed-Chat: the same models, flags and data, runs alternated.

    python benchmarks/bench_vs_upstream.py --upstream /work/upstream/applications/DeepSpeed-Chat \\
        --model opt-125m --zero 2 --steps 5 --repeats 1 --json out.json

`--upstream` is a checkout of microsoft/DeepSpeedExamples' `applications/DeepSpeed-Chat`, run unpatched
on the CPU (DS_ACCELERATOR=cpu, `--local_rank 0` with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* set, or torchrun
for 2 processes). The script saves a random actor of the `--model` shape as step 1 would, a reward model
on the same backbone both as ours (safetensors + value head) and in upstream's layout
(`pytorch_model.bin` with `rwtransformer.*` and `v_head.weight`), writes the bundled prompts to
`<upstream>/data/{train,eval}.json` (what upstream's `local/jsonfile` reads), then runs, alternated
`--repeats` times: upstream (greedy, its only decoding), ours greedy (`--greedy_generation`) and ours
sampling (the default). Per-step time is the wall clock between consecutive step log lines of each run
(so the first step, with its one-off costs, is excluded; the same clock on both sides: upstream's own
"End-to-End" figure leaves out the experience forwards); whole-process time is the process's wall
clock; our generation/experience/training shares come from our training_summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

UPSTREAM_STEP_LINE = re.compile(r"^End-to-End => Latency")
OUR_STEP_LINE = re.compile(r"^\[step3\] epoch \d+ step \d+")
RANK_SHIM = """import os, runpy, sys
sys.argv += ["--local_rank", os.environ["LOCAL_RANK"]]
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""
# Upstream's critic under ZeRO-3 with DeepSpeed 0.19.8: zero.Init makes the backbone bf16 but RewardModel's
# v_head is built after it, in fp32, and the stage-3 optimizer's defragment asserts one dtype. The one change
# made to upstream (only for --zero 3, and said so in the output): v_head takes the backbone's dtype.
V_HEAD_SHIM = """from dschat.utils.model import reward_model as _rm
_init = _rm.RewardModel.__init__
def _init_same_dtype(self, base_model, *args, **kwargs):
    _init(self, base_model, *args, **kwargs)
    self.v_head.to(next(base_model.parameters()).dtype)
_rm.RewardModel.__init__ = _init_same_dtype
"""
# ours_*_unfused: --no_fused_kernels; ours_hybrid_*: our --enable_hybrid_engine (upstream's own hybrid engine
# crashes on transformers 4.55, so upstream runs without it unless --hybrid_engine asks for it on both sides)
SIDES = (
    "upstream",
    "ours_greedy",
    "ours_sampling",
    "ours_greedy_unfused",
    "ours_hybrid_greedy",
    "ours_hybrid_sampling",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True, type=Path, help="path of upstream's applications/DeepSpeed-Chat")
    p.add_argument("--model", default="opt-125m", choices=["tiny", "opt-125m", "opt-1.3b"])
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="actor and critic ZeRO stage")
    p.add_argument("--processes", type=int, default=1, help="ranks (torchrun above 1)")
    p.add_argument("--hybrid_engine", action="store_true", help="--enable_hybrid_engine on both sides")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--batch", type=int, default=4, help="per-device generation and training batch")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--answer", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="PPO steps per run (the first is not timed)")
    p.add_argument("--repeats", type=int, default=1, help="alternated rounds of all sides")
    p.add_argument("--sides", nargs="+", default=list(SIDES[:3]), choices=SIDES)
    p.add_argument("--json", type=Path, help="also write the rows and the setup here")
    p.add_argument("--work_dir", type=Path, help="keep models, logs and outputs here (default: a temporary dir)")
    args = p.parse_args(argv)
    if not (args.upstream / "training" / "step3_rlhf_finetuning" / "main.py").is_file():
        p.error(f"--upstream {args.upstream} has no training/step3_rlhf_finetuning/main.py; pass the path of "
                "DeepSpeedExamples' applications/DeepSpeed-Chat")  # fmt: skip
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step is not timed)")
    return args


def prepare_models(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, Path]:
    """(actor, our reward model, the same reward model in upstream's layout)."""
    from bench_generation import _save_random_checkpoints

    actor, reward = _save_random_checkpoints(argparse.Namespace(model=args.model), tmp)
    from dschat_hal.models import create_reward_model, load_tokenizer

    model = create_reward_model(str(reward), load_tokenizer(str(reward)))
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("rwtransformer.", "v_head."))}
    upstream_reward = tmp / "reward_upstream"
    upstream_reward.mkdir()
    for item in reward.iterdir():  # config and tokenizer files; upstream reads weights from pytorch_model.bin
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy2(item, upstream_reward / item.name)
    torch.save(state, upstream_reward / "pytorch_model.bin")
    # Upstream builds the reward model with `from_config`; under ZeRO-3 that runs inside zero.Init, where
    # OPT's `_init_weights` zeroes the padding row of a partitioned (empty) embedding: IndexError before the
    # first step. Without a pad id in its config the embedding has no padding row (upstream then sets
    # pad = eos itself), so upstream runs unpatched; the weights are the same.
    config_path = upstream_reward / "config.json"
    config = json.loads(config_path.read_text())
    config["pad_token_id"] = None
    config_path.write_text(json.dumps(config, indent=2))
    return actor, reward, upstream_reward


def install_data(upstream: Path) -> None:
    """Our bundled prompts where upstream's `local/jsonfile` reads them."""
    from dschat_hal.models.tiny import DATA_DIR

    (upstream / "data").mkdir(exist_ok=True)
    for name in ("train.json", "eval.json"):
        shutil.copy2(DATA_DIR / name, upstream / "data" / name)


def common_flags(args: argparse.Namespace, actor: Path, reward: Path, out: Path) -> list[str]:
    flags = ["--data_path", "local/jsonfile", "--data_split", "2,4,4", "--data_output_path", str(out / "cache"),
             "--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", str(reward),
             "--num_padding_at_beginning", "1", "--per_device_generation_batch_size", str(args.batch),
             "--per_device_training_batch_size", str(args.batch), "--generation_batches", "1", "--ppo_epochs", "1",
             "--max_prompt_seq_len", str(args.prompt), "--max_answer_seq_len", str(args.answer),
             "--actor_learning_rate", "1e-6", "--critic_learning_rate", "1e-6", "--num_warmup_steps", "0",
             "--actor_zero_stage", str(args.zero), "--critic_zero_stage", str(args.zero), "--dtype", args.dtype,
             "--enable_test_mode", "--test_stop_step", str(args.steps), "--output_dir", str(out / "model")]  # fmt: skip
    return flags + (["--enable_hybrid_engine"] if args.hybrid_engine else [])


def launcher(args: argparse.Namespace, port: int) -> list[str]:
    if args.processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
            "--master_port", str(port)]  # fmt: skip


def timed_run(cmd: list[str], env: dict[str, str], cwd: Path, step_line: re.Pattern, log: Path) -> dict:
    """Run `cmd`; the wall clock of the process and of each step log line as it arrives."""
    started = time.perf_counter()
    stamps = []
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            if step_line.search(line):
                stamps.append(time.perf_counter())
        code = proc.wait()
    total = time.perf_counter() - started
    text = log.read_text()
    # Upstream's save_hf_format ends with tokenizer.save_vocabulary, which our tokenizer-only-JSON tiny
    # tokenizer does not implement: the weights are written by then and every step has run.
    saved_then_vocab_failed = "saving model" in text and "save_vocabulary" in text.rsplit("saving model", 1)[1]
    if code != 0 and not saved_then_vocab_failed:
        errors = [line for line in text.splitlines() if re.search(r"\w(Error|Exception)\b", line)][:8]
        tail = "\n".join(errors + text.splitlines()[-12:])
        raise SystemExit(f"run failed (exit {code}): {' '.join(cmd)}\nits log ends:\n{tail}")
    deltas = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"process_s": total, "steps_logged": len(stamps), "step_s": deltas}


def run_side(side: str, args: argparse.Namespace, models: tuple[Path, Path, Path], tmp: Path, round_: int) -> dict:
    actor, reward, upstream_reward = models
    out = tmp / f"{side}-{round_}"
    out.mkdir()
    port = 29500 + (os.getpid() + round_ * 7 + SIDES.index(side)) % 400
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    if side == "upstream":
        env["PYTHONPATH"] = str(args.upstream)
        if args.processes == 1:
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        script = args.upstream / "training" / "step3_rlhf_finetuning" / "main.py"
        rank = ["--local_rank", "0"]
        if args.processes > 1 or args.zero == 3:  # upstream reads its rank from --local_rank only
            shim = out / "upstream_shim.py"
            lines = [V_HEAD_SHIM] if args.zero == 3 else []
            shim.write_text("".join([*lines, RANK_SHIM.format(script=str(script))]))
            script, rank = shim, []
        cmd = [*launcher(args, port), str(script), *common_flags(args, actor, upstream_reward, out), *rank]
        result = timed_run(cmd, env, args.upstream, UPSTREAM_STEP_LINE, out / "log.txt")
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        script = ROOT / "training" / "step3_rlhf_finetuning" / "main.py"
        cmd = [*launcher(args, port), str(script), *common_flags(args, actor, reward, out), "--device", "cpu",
               "--log_interval", "1", *(["--greedy_generation"] if "greedy" in side else []),
               *(["--no_fused_kernels"] if side.endswith("unfused") else []),
               *(["--enable_hybrid_engine"] if "hybrid" in side and not args.hybrid_engine else [])]  # fmt: skip
        result = timed_run(cmd, env, ROOT, OUR_STEP_LINE, out / "log.txt")
        history = json.loads((out / "model" / "training_summary.json").read_text())["history"][1:]
        phases = {p: sum(h[f"{p}_s"] for h in history) for p in ("generation", "experience", "training")}
        total = sum(phases.values()) or 1.0
        result["shares"] = {p: v / total for p, v in phases.items()}
    result.update(side=side, round=round_, command=" ".join(cmd))
    return result


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for side in SIDES:
        mine = [r for r in runs if r["side"] == side]
        if not mine:
            continue
        steps = [s for r in mine for s in r["step_s"]]
        row = {"side": side, "runs": len(mine), "timed_steps": len(steps),
               "step_median_s": statistics.median(steps) if steps else float("nan"),
               "process_median_s": statistics.median(r["process_s"] for r in mine)}  # fmt: skip
        if "shares" in mine[0]:
            row["shares"] = {p: statistics.mean(r["shares"][p] for r in mine) for p in mine[0]["shares"]}
        rows.append(row)
    base = next((r for r in rows if r["side"] == "upstream"), None)
    for row in rows:
        row["step_ratio_vs_upstream"] = row["step_median_s"] / base["step_median_s"] if base else None
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| side | per-step median s | ratio vs upstream | whole process s | generation / experience / training |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        shares = r.get("shares")
        share_text = " / ".join(f"{100 * shares[p]:.0f}%" for p in shares) if shares else "-"
        ratio = "-" if r["step_ratio_vs_upstream"] is None else f"{r['step_ratio_vs_upstream']:.2f}"
        lines.append(
            f"| {r['side']} | {r['step_median_s']:.2f} | {ratio} | {r['process_median_s']:.1f} | {share_text} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from accel.cpu import describe_cpu

    args = parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    load = os.getloadavg()[0]
    setup = (f"{args.model} shape, random weights, {args.dtype}, ZeRO-{args.zero} x{args.processes}, "
             f"--enable_hybrid_engine {'on every side' if args.hybrid_engine else 'on ours_hybrid_* sides only'}, batch {args.batch}, prompt {args.prompt} + "
             f"answer {args.answer}, {args.steps} steps x {args.repeats} alternated round(s); torch {torch.__version__}; "
             f"{os.cpu_count()} CPUs ({describe_cpu()}), load average {load:.1f} at the start")  # fmt: skip
    runs = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name) if args.work_dir is None else args.work_dir
        tmp.mkdir(parents=True, exist_ok=True)
        models = prepare_models(args, tmp)
        install_data(args.upstream)
        for round_ in range(args.repeats):
            for side in args.sides:
                runs.append(run_side(side, args, models, tmp, round_))
                print(f"{side} round {round_}: steps {[round(s, 2) for s in runs[-1]['step_s']]}, "
                      f"process {runs[-1]['process_s']:.1f}s", flush=True)  # fmt: skip
    rows = summarise(runs)
    print(setup)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "rows": rows, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
