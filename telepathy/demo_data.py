"""Generates the shipped demo task (telepathy/data/demo/{train,eval}.jsonl): synthetic, license-clean.

Each text is neutral filler with one or two topic keywords mixed in; the label (animal, food, weather,
sport) depends only on those keywords. The receiver sees only the primer "Topic:", so alone it is at
chance (25 %); through the bridge it must read the sender. A tiny random-weight pair learns it in a few
hundred CPU steps (tests/test_data.py). Deterministic: the same seed writes the same bytes.

    python -m telepathy.demo_data            # rewrites the committed files
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from telepathy.files import atomic_write_text
from telepathy.paths import configs_dir

LABELS = ("animal", "food", "weather", "sport")
KEYWORDS = {
    "animal": ("cat", "dog", "horse", "rabbit", "tiger", "eagle", "whale", "fox", "sheep", "owl"),
    "food": ("bread", "cheese", "apple", "soup", "rice", "pasta", "cake", "salad", "butter", "honey"),
    "weather": ("rain", "snow", "storm", "thunder", "fog", "wind", "sunshine", "frost", "cloud", "hail"),
    "sport": ("football", "tennis", "soccer", "hockey", "golf", "rugby", "cricket", "boxing", "cycling", "swimming"),
}
FILLER = (
    "the",
    "a",
    "we",
    "they",
    "saw",
    "talked",
    "about",
    "near",
    "yesterday",
    "morning",
    "old",
    "new",
    "quite",
    "very",
    "house",
    "street",
    "friend",
    "there",
    "was",
    "some",
    "and",
    "then",
    "later",
    "again",
    "small",
    "large",
    "people",
    "town",
    "today",
    "often",
    "remember",
    "that",
    "with",
    "our",
    "their",
    "evening",
    "walked",
    "past",
    "window",
    "road",
    "story",
    "picture",
    "heard",
    "many",
)
SEED = 1234


def make_examples(n: int, rng: random.Random) -> list[dict[str, str]]:
    """n examples, classes balanced (round robin, then shuffled)."""
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = [rng.choice(FILLER) for _ in range(rng.randint(6, 14))]
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randint(0, len(words)), rng.choice(KEYWORDS[label]))
        text = " ".join(words)
        rows.append({"text": text[0].upper() + text[1:] + ".", "label": label})
    rng.shuffle(rows)
    return rows


def write(out: Path, n_train: int = 2000, n_eval: int = 200, seed: int = SEED) -> None:
    rng = random.Random(seed)
    for name, n in (("train", n_train), ("eval", n_eval)):
        lines = "".join(json.dumps(r) + "\n" for r in make_examples(n, rng))
        atomic_write_text(out / f"{name}.jsonl", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=configs_dir() / "tasks" / "demo")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    write(args.out, seed=args.seed)


if __name__ == "__main__":
    main()
