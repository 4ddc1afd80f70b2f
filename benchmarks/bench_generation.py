"""Step-3 generation benchmark: HF `generate` vs the hybrid engine, in DeepSpeed engines, side by side.

    python benchmarks/bench_generation.py --model opt-125m --zero 2                       # one process
    python benchmarks/bench_generation.py --model opt-125m --zero 3 --processes 2             # 2 ranks (torchrun)
    python benchmarks/bench_generation.py --step3 --model opt-125m --zero 3 --processes 2     # PPO samples/s

Modes, each generating exactly `--answer` tokens per row (greedy, EOS ignored):
  (a) hf         HF `generate` on the DeepSpeed engine's module (synced ranks under ZeRO-3)
  (b) hf_static  the same with `cache_implementation="static"`
  (c) engine     the project's hybrid engine (`dschat_hal.rlhf.generation.engine.HybridEngine`)
  (d) engine_tpT  the hybrid engine generating tensor-parallel on groups of T ranks (`--inference_tp_size T`)
Weights are random, built from a config of the named shape. The table gives seconds (median of
`--repeats` after `--warmup` phases), tokens/s, speed-up over (a), whether the tokens equal (a)'s, and the
ratio to the memory-bandwidth floor (answer tokens x weight bytes / the device's measured copy bandwidth),
and per rank the engine's inference-copy and KV-cache megabytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import accel  # noqa: E402  # isort: skip  (before torch: the HPU bridge fixes lazy or eager mode when torch loads it)
import torch  # noqa: E402  # isort: skip

SHAPES = {  # name: (family, config overrides) — random weights, no download
    "tiny": ("opt", {"hidden_size": 64, "word_embed_proj_dim": 64, "ffn_dim": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "vocab_size": 1024}),
    "opt-125m": ("opt", {}),
    "opt-1.3b": ("opt", {"hidden_size": 2048, "word_embed_proj_dim": 2048, "ffn_dim": 8192,
                         "num_hidden_layers": 24, "num_attention_heads": 32}),
    "tiny-bloom": ("bloom", {"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1024}),
    "bloom-1b1": ("bloom", {"hidden_size": 1536, "n_layer": 24, "n_head": 16, "vocab_size": 250880}),
    "llama-2-7b": ("llama", {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                             "max_position_embeddings": 4096}),
}  # fmt: skip
MODES = ("hf", "hf_static", "engine")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-125m", choices=list(SHAPES))
    p.add_argument("--zero", type=int, nargs="+", default=[2], choices=[0, 1, 2, 3], help="ZeRO stages to run")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--answer", type=int, default=128)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--processes", type=int, default=1, help="processes (torchrun) — 2 for ZeRO-3 on the CPU")
    p.add_argument("--warmup", type=int, default=1, help="phases per mode before timing (at least the first)")
    p.add_argument("--repeats", type=int, default=3, help="timed phases per mode, interleaved (0: time the first)")
    p.add_argument(
        "--inference_tp_size", type=int, nargs="+", default=[1], help="engine: tensor-parallel group sizes to run"
    )
    p.add_argument("--device_graphs", action="store_true", help="engine: capture the decode step (CUDA/HPU)")
    p.add_argument("--step3", action="store_true", help="samples/s of full PPO steps with and without the engine")
    p.add_argument("--steps", type=int, default=4, help="--step3: PPO steps per run (the first is not timed)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def memory_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Bytes/s of a large device-to-device copy (read + write), best of 5."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        accel.current().synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        accel.current().synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def build_model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    family, overrides = SHAPES[name]
    base = "facebook/opt-125m" if family == "opt" else None
    config = AutoConfig.for_model(family) if base is None else _opt_125m_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, torch_dtype=dtype)


def _opt_125m_config():
    from transformers import OPTConfig

    return OPTConfig()  # OPTConfig's defaults are the OPT-125m shape


def _engine(model: torch.nn.Module, stage: int, args: argparse.Namespace, backend):
    from dschat_hal.configs import HardwareConfig, LoggingConfig, OptimConfig, ScheduleConfig
    from dschat_hal.runtime import engine_from_config

    return engine_from_config(
        backend, model, OptimConfig(learning_rate=1e-5, lora_learning_rate=1e-5, zero_stage=stage),
        ScheduleConfig(lr_scheduler_type="constant"), HardwareConfig(no_fused_kernels=True), LoggingConfig(),
        dtype=backend.resolve_dtype(args.dtype), total_steps=1, micro_batch=args.batch, job_name="train",
    )  # fmt: skip


def _timed(fn, backend) -> tuple[float, torch.Tensor]:
    import torch.distributed as dist

    backend.synchronize()
    dist.barrier()
    start = time.perf_counter()
    out = fn()
    backend.synchronize()
    dist.barrier()
    return time.perf_counter() - start, out


def run_generation(args: argparse.Namespace) -> list[dict]:
    """All modes for every ZeRO stage, in this process (one rank of a torchrun world, or alone)."""
    from dschat_hal.rlhf.generation import make_hybrid_engine
    from dschat_hal.rlhf.generation.hf_generate import PlainGenerator
    from dschat_hal.rlhf.generation.sampling import GenerationConfig
    from dschat_hal.runtime import rank

    backend = accel.get(args.device)
    backend.init_distributed()
    backend.use_graphs = args.device_graphs
    dtype = backend.resolve_dtype(args.dtype)
    bandwidth = memory_bandwidth(backend.device)
    config = GenerationConfig(max_answer_seq_len=args.answer, pad_token_id=1, eos_token_id=2, do_sample=False,
                              ignore_eos=True)  # fmt: skip
    generator = torch.Generator().manual_seed(rank())
    prompts = backend.to_device(torch.randint(4, 1000, (args.batch, args.prompt), generator=generator))
    mask = torch.ones_like(prompts)
    rows = []
    for stage in args.zero:
        engine = _engine(build_model(args.model, dtype), stage, args, backend)
        weight_bytes = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()) * dtype.itemsize
        floor = args.answer * weight_bytes / bandwidth
        calls, generators = {}, {}
        for mode in args.modes:
            if mode == "engine":
                for tp in args.inference_tp_size:
                    name = "engine" if tp == 1 else f"engine_tp{tp}"
                    gen = generators[name] = make_hybrid_engine(
                        engine, backend, config, inference_tp_size=tp, dtype=dtype
                    )
                    calls[name] = lambda gen=gen: gen.generate(prompts, mask)  # noqa: E731
            else:
                extra = {"cache_implementation": "static"} if mode == "hf_static" else {}
                gen = PlainGenerator(engine, backend, config)
                calls[mode] = lambda gen=gen, extra=extra: gen.generate(prompts, mask, **extra)  # noqa: E731
        first, outputs, times = {}, {}, {mode: [] for mode in calls}
        for mode, call in calls.items():  # the first phase builds copies, caches and compiled graphs
            first[mode], outputs[mode] = _timed(call, backend)
            for _ in range(args.warmup - 1):
                _timed(call, backend)
        for _ in range(args.repeats):  # modes interleaved, so that load on the machine hits each alike
            for mode, call in calls.items():
                seconds, outputs[mode] = _timed(call, backend)
                times[mode].append(seconds)
        for mode in calls:
            seconds = statistics.median(times[mode] or [first[mode]])
            same = None if mode == "hf" or "hf" not in outputs else bool(torch.equal(outputs[mode], outputs["hf"]))
            rows.append({
                "zero": stage, "mode": mode, "seconds": seconds, "first_phase_s": first[mode],
                "tokens_per_s": args.batch * args.answer / seconds, "tokens_equal_hf": same,
                "floor_s": floor, "x_floor": seconds / floor, **_footprint(generators.get(mode)),
            })  # fmt: skip
        del engine
    for row in rows:
        row["graph_counts"] = dict(backend.graph_counts) if args.device_graphs and backend.graph_counts else None
        base = next((r for r in rows if r["zero"] == row["zero"] and r["mode"] == "hf"), None)
        row["speedup_vs_hf"] = base["seconds"] / row["seconds"] if base else None
    return rows


def _footprint(gen) -> dict:
    """Every rank's inference-copy and KV-cache megabytes of an engine (none for HF `generate`)."""
    import torch.distributed as dist

    from dschat_hal.rlhf.generation.decode import cache_tensors
    from dschat_hal.rlhf.generation.engine import MB

    if gen is None:
        return {}
    copy = getattr(gen, "form", None) or gen.copy
    mine = [
        (copy.nbytes if copy is not None else 0) / MB,
        sum(t.numel() * t.element_size() for t in cache_tensors(gen._cache)) / MB if gen._cache is not None else 0,
    ]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {"copy_mb": [r[0] for r in everyone], "cache_mb": [r[1] for r in everyone]}


def run_step3(args: argparse.Namespace) -> list[dict]:
    """Full PPO steps through training/step3_rlhf_finetuning/main.py, without and with the engine."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        actor, reward = _save_random_checkpoints(args, Path(tmp))
        for stage in args.zero:
            for hybrid in (False, True):
                out = Path(tmp) / f"rlhf-z{stage}-{int(hybrid)}"
                cmd = [*_launcher(args), str(ROOT / "training/step3_rlhf_finetuning/main.py"),
                       "--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", str(reward),
                       "--actor_zero_stage", str(stage), "--critic_zero_stage", str(stage), "--device", args.device,
                       "--dtype", args.dtype, "--max_prompt_seq_len", str(args.prompt),
                       "--max_answer_seq_len", str(args.answer), "--per_device_generation_batch_size", str(args.batch),
                       "--per_device_training_batch_size", str(args.batch), "--enable_test_mode",
                       "--test_stop_step", str(args.steps), "--log_interval", "1", "--quiet",
                       "--data_output_path", str(Path(tmp) / "cache"), "--output_dir", str(out),
                       "--actor_learning_rate", "1e-6", "--critic_learning_rate", "1e-6",
                       *(["--enable_hybrid_engine"] if hybrid else [])]  # fmt: skip
                subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
                history = json.loads((out / "training_summary.json").read_text())["history"][1:]
                step_s = statistics.mean(h["generation_s"] + h["experience_s"] + h["training_s"] for h in history)
                gen_s = statistics.mean(h["generation_s"] for h in history)
                samples = args.batch * args.processes
                rows.append({"zero": stage, "mode": "engine" if hybrid else "hf", "step_s": step_s,
                             "generation_s": gen_s, "samples_per_s": samples / step_s})  # fmt: skip
        for row in rows:
            base = next(r for r in rows if r["zero"] == row["zero"] and r["mode"] == "hf")
            row["speedup_vs_hf"] = row["samples_per_s"] / base["samples_per_s"]
    return rows


def _save_random_checkpoints(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    """A random actor of the benchmark shape and a reward model on the same backbone, saved as step 1/2 would."""
    from dschat_hal.models import create_reward_model, load_tokenizer
    from dschat_hal.models.checkpoint import save_lm
    from dschat_hal.models.lm import padded_vocab_size

    tokenizer = load_tokenizer("tiny-opt")
    model = build_model(args.model, torch.float32)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(padded_vocab_size(tokenizer))
    save_lm(model, tokenizer, tmp / "actor")
    create_reward_model(str(tmp / "actor"), tokenizer).save(tmp / "reward", tokenizer)
    return tmp / "actor", tmp / "reward"


def _launcher(args: argparse.Namespace) -> list[str]:
    if args.processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
            "--master_port", str(29700 + os.getpid() % 200)]  # fmt: skip


def table(rows: list[dict], args: argparse.Namespace) -> str:
    if args.step3:
        head = "| ZeRO | mode | PPO step s | generation s | samples/s | speed-up vs hf |\n|---|---|---|---|---|---|"
        lines = [f"| {r['zero']} | {r['mode']} | {r['step_s']:.2f} | {r['generation_s']:.2f} | "
                 f"{r['samples_per_s']:.2f} | {r['speedup_vs_hf']:.2f}x |" for r in rows]  # fmt: skip
    else:
        head = ("| ZeRO | mode | seconds | first phase s | tokens/s | speed-up vs hf | tokens = hf | x floor "
                "| copy MB/rank | KV cache MB/rank |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
        lines = [f"| {r['zero']} | {r['mode']} | {r['seconds']:.2f} | {r['first_phase_s']:.2f} | "
                 f"{r['tokens_per_s']:.1f} | {_speedup(r['speedup_vs_hf'])} | "
                 f"{'-' if r['tokens_equal_hf'] is None else 'yes' if r['tokens_equal_hf'] else 'no'} | "
                 f"{r['x_floor']:.1f} | {_per_rank(r.get('copy_mb'))} | {_per_rank(r.get('cache_mb'))} |"
                 for r in rows]  # fmt: skip
    return "\n".join([head, *lines])


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"  # "-": no hf row to compare with (--modes without hf)


def _per_rank(values: list[float] | None) -> str:
    return "-" if not values else " / ".join(f"{v:.1f}" for v in values)


def describe(args: argparse.Namespace) -> str:
    import deepspeed
    import transformers

    from accel.cpu import describe_cpu

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    what = "PPO steps" if args.step3 else "generation"
    return (
        f"{what}: {args.model} shape, random weights, {args.dtype}, batch {args.batch}/rank, prompt {args.prompt}, "
        f"answer {args.answer}, {args.processes} process(es), device {args.device}; torch {torch.__version__}, "
        f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}; "
        f"{os.cpu_count()} CPUs ({describe_cpu()}), load average {load:.1f} at the start"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    header = describe(args)
    if args.step3:
        rows = run_step3(args)
    elif args.worker_out or args.processes == 1:
        rows = run_generation(args)
        if args.worker_out:
            from dschat_hal.runtime import is_rank0

            if is_rank0():
                Path(args.worker_out).write_text(json.dumps(rows))
            return 0
    else:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            argv = [a for a in (argv if argv is not None else sys.argv[1:])]
            subprocess.run([*_launcher(args), __file__, *argv, "--worker_out", out.name], check=True, cwd=ROOT)
            rows = json.loads(Path(out.name).read_text())
    print(header)
    print(table(rows, args))
    counts = next((r["graph_counts"] for r in rows if r.get("graph_counts")), None)
    if counts:  # where the backend counts its graphs (HPU): this process's, all modes and stages
        print(f"device graphs: {counts['captures']} captured, {counts['replays']} replays")
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
