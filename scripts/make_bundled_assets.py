"""Regenerate the bundled preference dataset and the tiny byte-level BPE tokenizer.

    python scripts/make_bundled_assets.py

Writes `dschat_hal/assets/data/{train,eval}.json` (prompt/chosen/rejected, "Human: … Assistant:")
and `dschat_hal/assets/tokenizer/` (loadable with `AutoTokenizer.from_pretrained`, trained on the
train rows only). Deterministic. The chosen answers are on-topic and helpful; the rejected ones are
curt refusals or off-topic, so a reward model can learn the preference from a few hundred rows.

The eval prompts are held out, not paraphrases of train prompts: their tasks and question
templates never occur in train (so neither do their chosen answers); openers and refusals, the
style a reward model is to learn, are shared. Eval perplexity and reward accuracy then measure
generalisation to new questions, not recall of seen ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "dschat_hal" / "assets"

TASKS = {
    "boil an egg": "Put the egg in boiling water for about nine minutes, then cool it in cold water.",
    "water a cactus": "Water it deeply about once a month and let the soil dry out completely in between.",
    "learn to swim": "Start in shallow water with an instructor, practise floating, then add kicks and strokes.",
    "save money each month": "Write down what you spend, set a fixed amount aside on payday, and cut one small expense.",
    "sleep better": "Keep a regular bedtime, avoid screens for an hour before bed, and keep the room cool and dark.",
    "fix a flat bicycle tyre": "Remove the wheel, find the hole, patch or replace the tube, and pump it to the right pressure.",
    "make a cup of tea": "Boil fresh water, pour it over the tea, wait three to five minutes, then remove the leaves.",
    "write a short poem": "Pick one image you care about, write a few plain lines about it, then read them aloud and trim.",
    "study for an exam": "Split the material into small parts, test yourself on each one, and review the hard parts daily.",
    "plant tomatoes": "Plant them in a sunny spot after the last frost, water at the base, and give them a stake to climb.",
    "clean a window": "Mix water with a little vinegar, wipe the glass, then dry it with a clean cloth in straight strokes.",
    "start running": "Begin with short runs mixed with walking three times a week, and add a few minutes each week.",
    "bake bread": "Mix flour, water, salt and yeast, knead it, let it rise, shape it, and bake until it sounds hollow.",
    "tie a tie": "Cross the wide end over, loop it up through the neck, pull it down through the knot, and tighten.",
    "remember names": "Repeat the name when you hear it, link it to something about the person, and use it again soon.",
    "keep a plant alive": "Give it the light it likes, water only when the top of the soil is dry, and feed it in spring.",
    "cook rice": "Rinse the rice, use about two cups of water per cup of rice, simmer covered, then let it rest.",
    "stay focused": "Work in blocks of twenty five minutes, silence your phone, and take a short break after each block.",
    "organise a desk": "Clear everything off, keep only what you use daily, and give every other item a fixed place.",
    "learn a new word": "Read it in a sentence, say it aloud, write your own sentence with it, and review it tomorrow.",
    "make friends in a new city": "Join a club or class that meets weekly, say yes to invitations, and follow up with people.",
    "calm down when angry": "Breathe slowly for a minute, step away for a moment, and name what made you angry.",
    "paint a room": "Cover the floor, tape the edges, apply a primer if needed, then two thin coats of paint.",
    "back up my photos": "Copy them to an external drive and to a second place, and repeat the copy on a fixed day.",
    "write a thank you note": "Name the gift or help, say how it mattered to you, and end with a warm wish.",
    "wash a wool sweater": "Use cool water and a gentle soap, press out the water without wringing, and dry it flat.",
    "prepare for an interview": "Read about the company, practise answers to common questions aloud, and prepare two questions.",
    "keep bread fresh": "Store it in a paper bag at room temperature, and freeze slices you will not eat in two days.",
    "train a puppy to sit": "Hold a treat above its nose, move it back until the puppy sits, then reward it at once.",
    "read more books": "Carry a book everywhere, read ten pages before bed, and drop books you do not enjoy.",
}

# held out: tasks and question templates used only by the eval rows
EVAL_TASKS = {
    "brew coffee with a French press": "Add coarse coffee, pour hot water, wait four minutes, then press the plunger down.",
    "clean a cast iron pan": "Rinse it with hot water, scrub off food without soap, dry it on the stove, and oil it.",
    "fold a fitted sheet": "Tuck the corners into each other, lay it flat, fold the edges in, then fold it into a square.",
    "change a light bulb": "Switch off the power, let the bulb cool, twist it out, and screw in one of the same type.",
    "grow herbs on a windowsill": "Use small pots with drainage, give them five hours of sun, and water when the soil is dry.",
    "write a cover letter": "Name the job, show two achievements that fit it, and close by asking for an interview.",
    "stop procrastinating": "Pick the smallest next step, set a timer for ten minutes, and start before you feel ready.",
    "care for a goldfish": "Keep it in a large filtered tank, change part of the water weekly, and feed it a pinch a day.",
    "pack a suitcase": "Lay out what you need, roll the clothes, put heavy items at the bottom, and bag the liquids.",
    "make pancakes": "Whisk flour, milk, eggs and a pinch of salt, rest the batter, and fry thin rounds in a hot pan.",
}
EVAL_QUESTIONS = [
    "Walk me through how to {t}.",
    "What would you suggest if someone wants to {t}?",
    "Tell me the trick to {t}.",
    "How would a complete novice {t}?",
    "Share your advice: I need to {t}.",
    "Do you know a good method to {t}?",
]

QUESTIONS = [
    "How do I {t}?",
    "What is the best way to {t}?",
    "Can you tell me how to {t}?",
    "I want to {t}. Where should I start?",
    "Could you explain how to {t}?",
    "Any tips on how to {t}?",
    "What should I know before I try to {t}?",
    "Please help me {t}.",
    "Is there an easy way to {t}?",
    "My friend asked me how to {t}. What do I say?",
    "I have never tried to {t}. How does it work?",
    "Give me a simple plan to {t}.",
    "What steps do I follow to {t}?",
    "I keep failing to {t}. Any advice?",
    "Explain to a beginner how to {t}.",
]

OPENERS = ["Sure, happy to help.", "Good question.", "Here is a simple way.", "Of course.", "Glad you asked."]
REJECTED = [
    "I don't know.",
    "Figure it out yourself.",
    "That is not my problem.",
    "Why would you want to do that?",
    "No.",
    "Look it up somewhere else.",
    "I would rather talk about the weather.",
    "Bananas are yellow.",
]


def build_rows(
    tasks: dict[str, str], questions: list[str], openers: list[str], rejected: list[str], rng: random.Random
) -> list[dict[str, str]]:
    rows = []
    for task, answer in tasks.items():
        for question in questions:
            rows.append(
                {
                    "prompt": f"Human: {question.format(t=task)} Assistant:",
                    "chosen": f" {rng.choice(openers)} {answer}",
                    "rejected": f" {rng.choice(rejected)}",
                }
            )
    rng.shuffle(rows)
    return rows


def build_split(seed: int = 1234, n_train: int = 400) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, eval) rows: eval from the held-out tasks and templates only;
    train keeps `n_train` of its rows (the demo's size)."""
    rng = random.Random(seed)
    train = build_rows(TASKS, QUESTIONS, OPENERS, REJECTED, rng)[:n_train]
    evaluation = build_rows(EVAL_TASKS, EVAL_QUESTIONS, OPENERS, REJECTED, rng)
    return train, evaluation


def write_dataset(train: list[dict[str, str]], evaluation: list[dict[str, str]]) -> None:
    out = ASSETS / "data"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(train, indent=1) + "\n")
    (out / "eval.json").write_text(json.dumps(evaluation, indent=1) + "\n")


def train_tokenizer(rows: list[dict[str, str]], vocab_size: int = 1024) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        show_progress=False,
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=2048,
    )
    fast.save_pretrained(ASSETS / "tokenizer")


if __name__ == "__main__":
    train, evaluation = build_split()
    write_dataset(train, evaluation)
    train_tokenizer(train)
    print(f"wrote {len(train)} train and {len(evaluation)} held-out eval rows and a tokenizer under {ASSETS}")
