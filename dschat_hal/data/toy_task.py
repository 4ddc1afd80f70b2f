"""A toy RLHF task with a known optimum, for proving that step 3 learns.

Answers open with one word from a small set; the feature word is rare in the SFT data (the actor
learns to say it rarely) and present in every chosen answer of the preference data (the reward
model learns to reward it). PPO should then raise how often the actor says it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FEATURE = " happy"
OTHER_OPENERS = [" Sure", " Okay", " Well", " Yes", " Right", " Fine", " Now", " So"]


def _prompts() -> list[tuple[str, str]]:
    from dschat_hal.models.tiny import DATA_DIR

    rows = json.loads((DATA_DIR / "train.json").read_text()) + json.loads((DATA_DIR / "eval.json").read_text())
    pairs = []
    for row in rows:
        body = row["chosen"].split(".", 1)[-1].strip().split(",")[0].split(".")[0]
        pairs.append((row["prompt"], " " + " ".join(body.split()[:4]) + "."))
    return pairs


def write_feature_task(out_dir: str | Path, feature_rate: float = 0.2, seed: int = 0) -> dict[str, Path]:
    """Write `sft/` and `rm/` datasets (train.json + eval.json) under `out_dir`; returns their paths."""
    rng = random.Random(seed)
    out = Path(out_dir)
    prompts = _prompts()
    words = sorted({w for _, body in prompts for w in body.strip(" .").split()} | {"a", "the", "in", "and"})
    sft, rm = [], []
    for prompt, body in prompts:
        other = rng.choice(OTHER_OPENERS)
        opener = FEATURE if rng.random() < feature_rate else other
        sft.append({"prompt": prompt, "chosen": f"{opener},{body}", "rejected": f"{other},{body}"})
        rm.append({"prompt": prompt, "chosen": f"{FEATURE},{body}", "rejected": f"{other},{body}"})
        # the same word soup on both sides: only the feature separates them, so degenerate text
        # without the feature cannot score well (no reward hacking through odd bodies)
        soup = " " + " ".join(rng.choices(words, k=rng.randint(1, 8))) + "."
        rm.append({"prompt": prompt, "chosen": f"{FEATURE},{soup}", "rejected": f"{rng.choice(OTHER_OPENERS)},{soup}"})
    paths = {}
    for name, rows in (("sft", sft), ("rm", rm)):
        directory = out / name
        directory.mkdir(parents=True, exist_ok=True)
        cut = len(rows) // 10
        (directory / "train.json").write_text(json.dumps(rows[cut:]))
        (directory / "eval.json").write_text(json.dumps(rows[:cut]))
        paths[name] = directory
    return paths
