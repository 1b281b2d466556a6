"""Regenerate the built-in data files (deterministic, seed 0).

    python -m ftlab.data.builtin.generate

- ``tasks.jsonl`` (format ``instruction``), described below;
- ``chat.jsonl`` (format ``chat``): the same records as conversations, one user turn (the
  instruction and its input) and one assistant turn (the answer), so a chat run can be
  compared with an instruction run on the same task and metric;
- ``sharegpt.jsonl`` (format ``sharegpt``): the same conversations in ShareGPT's form
  (``conversations`` of ``{from: human|gpt, value}``);
- ``sentiment.jsonl`` (format ``classification``): short review sentences labelled
  ``positive`` or ``negative``, built from subjects, adjectives, intensifiers and negation
  ("The soup was not fresh." is negative), all distinct, balanced.

The text corpus (``corpus/``, format ``text``) is prose written for ftlab, not generated.

``tasks.jsonl``: six short tasks, each with one exact answer, so greedy generation can be scored by exact match:
capitals, two-number addition, antonyms, irregular and regular plurals, upper-casing a word,
and counting the words of a sentence. An instruct model answers most of them in a sentence
("The capital of France is Paris."); fine-tuning teaches the short answer and the task.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Canada": "Ottawa",
    "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Peru": "Lima", "Chile": "Santiago",
    "Mexico": "Mexico City", "Cuba": "Havana", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "Indonesia": "Jakarta", "Iran": "Tehran", "Iraq": "Baghdad",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Czechia": "Prague",
    "Romania": "Bucharest", "Ukraine": "Kyiv", "Nigeria": "Abuja", "Morocco": "Rabat",
    "Colombia": "Bogota", "Venezuela": "Caracas", "New Zealand": "Wellington", "Philippines": "Manila",
    "Pakistan": "Islamabad", "Saudi Arabia": "Riyadh", "Ethiopia": "Addis Ababa",
}
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "open": "closed",
    "early": "late", "strong": "weak", "rich": "poor", "young": "old", "full": "empty", "high": "low",
    "hard": "soft", "wet": "dry", "loud": "quiet", "long": "short", "thick": "thin", "clean": "dirty",
    "cheap": "expensive", "true": "false", "win": "lose", "buy": "sell", "push": "pull",
    "above": "below", "inside": "outside", "first": "last", "heavy": "light", "near": "far",
    "right": "left", "up": "down", "love": "hate", "begin": "end", "alive": "dead", "safe": "dangerous",
    "friend": "enemy", "question": "answer", "north": "south", "east": "west", "day": "night",
    "sweet": "sour",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
    "woman": "women", "goose": "geese", "person": "people", "cactus": "cacti", "leaf": "leaves",
    "knife": "knives", "wolf": "wolves", "box": "boxes", "city": "cities", "baby": "babies",
    "dog": "dogs", "car": "cars", "tree": "trees", "bus": "buses", "church": "churches",
    "glass": "glasses", "party": "parties", "potato": "potatoes", "hero": "heroes", "sheep": "sheep",
    "fish": "fish", "ox": "oxen", "life": "lives", "wife": "wives", "day": "days", "key": "keys",
    "boy": "boys", "story": "stories", "lady": "ladies", "bench": "benches", "fox": "foxes",
    "bird": "birds", "book": "books", "cup": "cups", "chair": "chairs",
}
WORDS = ("garden river window castle yellow pencil winter orange silver planet rocket candle "
         "forest bridge marble coffee dragon guitar harbor island jacket kitten lemon meadow "
         "needle ocean pepper quartz rabbit saddle tunnel velvet walnut zebra anchor basket").split()
SENTENCE_WORDS = ("the a cat dog sat ran on under big small red blue house tree quickly slowly "
                  "happy bird sang loud song near river boy girl read old book").split()


def generate(seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for country, city in CAPITALS.items():
        rows.append({"instruction": "What is the capital of this country? Answer with the city only.",
                     "input": country, "output": city})
    for word, opposite in ANTONYMS.items():
        rows.append({"instruction": "Give the opposite of this word.", "input": word, "output": opposite})
    for word, plural in PLURALS.items():
        rows.append({"instruction": "Give the plural of this noun.", "input": word, "output": plural})
    for word in WORDS:
        rows.append({"instruction": "Write this word in capital letters.", "input": word,
                     "output": word.upper()})
    # Distinct inputs only: a duplicate could land in both splits and leak the answer.
    sums: set[tuple[int, int]] = set()
    while len(sums) < 150:
        sums.add((rng.randint(10, 99), rng.randint(10, 99)))
    for a, b in sorted(sums):
        rows.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)})
    sentences: set[str] = set()
    while len(sentences) < 80:
        sentences.add(" ".join(rng.choice(SENTENCE_WORDS) for _ in range(rng.randint(3, 9))))
    for sentence in sorted(sentences):
        rows.append({"instruction": "How many words are in this sentence?", "input": sentence,
                     "output": str(len(sentence.split()))})
    rng.shuffle(rows)
    return rows


def chat_records(tasks: list[dict[str, str]]) -> list[dict]:
    """The tasks as one-turn conversations: the user asks, the assistant answers."""
    return [{"messages": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                          {"role": "assistant", "content": r["output"]}]} for r in tasks]


def sharegpt_records(chats: list[dict]) -> list[dict]:
    """The same conversations in ShareGPT's form: ``conversations`` of ``{from, value}``."""
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c["messages"]]}
            for c in chats]


SUBJECTS = ["The movie", "The soup", "The hotel room", "Our waiter", "This phone", "The concert",
            "The book", "The service", "The coffee", "The new album", "The hike", "The museum tour",
            "The laptop", "The pizza", "The staff", "The show", "The game", "The train ride",
            "The headphones", "The garden"]
POSITIVE = ["wonderful", "excellent", "delightful", "great", "charming", "superb", "lovely",
            "brilliant", "pleasant", "fantastic", "fresh", "friendly"]
NEGATIVE = ["awful", "terrible", "boring", "disappointing", "dreadful", "horrible", "poor",
            "unpleasant", "dull", "rude", "stale", "noisy"]
INTENSIFIERS = ["", "really ", "truly ", "quite ", "very ", "absolutely "]
TAILS = {"positive": ["", " I would go again.", " Highly recommended.", " What a treat."],
         "negative": ["", " Never again.", " I want my money back.", " What a waste."]}


def sentiment(seed: int = 0, n: int = 400) -> list[dict[str, str]]:
    """Balanced, distinct review sentences; negating a positive adjective makes it negative."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        label = "positive" if len(rows) % 2 == 0 else "negative"
        subject, verb = rng.choice(SUBJECTS), rng.choice(["was", "is"])
        if label == "negative" and rng.random() < 0.3:
            core = f"{subject} {verb} not {rng.choice(POSITIVE)}."
        else:
            words = POSITIVE if label == "positive" else NEGATIVE
            core = f"{subject} {verb} {rng.choice(INTENSIFIERS)}{rng.choice(words)}."
        text = core + rng.choice(TAILS[label])
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


def _write(name: str, rows: list[dict]) -> None:
    out = Path(__file__).with_name(name)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} records to {out}")


def main() -> None:
    rows = generate()
    _write("tasks.jsonl", rows)
    _write("chat.jsonl", chat_records(rows))
    _write("sharegpt.jsonl", sharegpt_records(chat_records(rows)))
    _write("sentiment.jsonl", sentiment())


if __name__ == "__main__":
    main()
