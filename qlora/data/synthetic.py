"""Deterministic generated data: the project's sample rows (samples/, the demo) and the pre-training text of
its small base model. Generated here, not copied from the real datasets."""

from __future__ import annotations

import random
from typing import Any, Callable


_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]

_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "shells", "stamps", "stickers"]

def _openmath_row(rng: random.Random) -> dict[str, Any]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    op = rng.choice(["+", "-"])
    if op == "-" and b > a:
        a, b = b, a
    answer = a + b if op == "+" else a - b
    verb = "finds" if op == "+" else "gives away"
    problem = f"{name} has {a} {item} and {verb} {b} more." if op == "+" else f"{name} has {a} {item} and {verb} {b}."
    problem += f" How many {item} does {name} have now?"
    solution = f"{name} starts with {a} {item}. {a} {op} {b} = {answer}. The answer is \\boxed{{{answer}}}."
    return {"problem": problem, "generated_solution": solution, "expected_answer": str(answer)}

_PLACES = ["Lumen", "Brask", "Orvel", "Tamsin", "Quill", "Zephyr", "Marrow", "Kestrel"]

_THINGS = ["a lighthouse", "a glass bridge", "a clock tower", "a salt market", "an old mill", "a river port"]

def _squad_row(rng: random.Random) -> dict[str, Any]:
    place, thing = rng.choice(_PLACES), rng.choice(_THINGS)
    year = rng.randint(1500, 1990)
    founder = rng.choice(_NAMES)
    context = f"The town of {place} is known for {thing}. It was built in {year} by {founder}."
    question, answer = rng.choice(
        [(f"When was {thing} in {place} built?", str(year)), (f"Who built {thing} in {place}?", founder),
         (f"What is {place} known for?", thing)]
    )
    return {"context": context, "question": question,
            "answers": {"text": [answer], "answer_start": [context.index(answer)]}}

SAMPLE_GENERATORS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "openmath": _openmath_row,
    "squad": _squad_row,
}

def generate_rows(name: str, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` deterministic synthetic rows in the schema of dataset `name`."""
    rng = random.Random(seed)
    return [SAMPLE_GENERATORS[name](rng) for _ in range(count)]

def arithmetic_pairs() -> list[tuple[int, str, int, int]]:
    """Every (a, op, b, result) the openmath sample generator can ask: a, b in 2..49, a - b only for a >= b."""
    pairs = []
    for a in range(2, 50):
        for b in range(2, 50):
            pairs.append((a, "+", b, a + b))
            if a >= b:
                pairs.append((a, "-", b, a - b))
    return pairs

_FACT_TEMPLATES = {
    "+": ["{a} + {b} = {r}.", "{a} plus {b} is {r}.", "Adding {b} to {a} gives {r}."],
    "-": ["{a} - {b} = {r}.", "{a} minus {b} is {r}.", "Taking {b} from {a} leaves {r}."],
}

_STORY_TEMPLATES = {
    "+": "{n} had {a} {i}. Then {n} found {b} more {i}, so now {n} had {r} {i}.",
    "-": "{n} had {a} {i}. Then {n} gave {b} {i} to a friend, so {r} {i} were left.",
}

def pretraining_texts(count: int, seed: int = 0, dense_share: float = 0.6, facts_per_line: int = 8) -> list[str]:
    """`count` deterministic lines of arithmetic facts in prose and short stories.

    They teach a small model the sums and differences of the openmath sample task, and how a result
    looks in `\\boxed{}` notation, but never in the task's chat format: a model pre-trained on them
    still has to be fine-tuned to answer the task's questions. A `dense_share` of the lines list
    `facts_per_line` random facts in the task's own `a op b = r.` notation (many facts per token).
    """
    rng = random.Random(seed)
    pairs = arithmetic_pairs()
    texts = []
    for _ in range(count):
        a, op, b, r = rng.choice(pairs)
        kind = rng.random()
        if kind < dense_share:
            texts.append(" ".join(f"{a} {op} {b} = {r}." for a, op, b, r in rng.sample(pairs, facts_per_line)))
        elif kind < dense_share + (1 - dense_share) * 0.75:
            texts.append(rng.choice(_FACT_TEMPLATES[op]).format(a=a, b=b, r=r))
        elif kind < dense_share + (1 - dense_share) * 0.95:
            texts.append(_STORY_TEMPLATES[op].format(n=rng.choice(_NAMES), i=rng.choice(_ITEMS), a=a, b=b, r=r))
        else:
            texts.append(f"{a} {op} {b} = {r}, written in a box as \\boxed{{{r}}}.")
    return texts

def long_rows(count: int, min_chars: int, seed: int = 0, variable: bool = False) -> list[dict]:
    """Prompt/completion rows whose completion is at least `min_chars` long, built from the project's
    generated openmath rows. With `variable`, completions of 1/64 to 1/3 of `min_chars` (for the
    benchmark's 8 * seq, about 80 to 500 tokens with its tokenizer: under seq, so nothing is truncated)."""
    rng = random.Random(seed)
    source = generate_rows("openmath", 50 * count + 50, seed)
    rows = []
    for i in range(count):
        target = rng.randint(min_chars // 64, min_chars // 3) if variable else min_chars
        text, j = "", 0
        while len(text) < target:
            text += source[(i * 50 + j) % len(source)]["generated_solution"] + " "
            j += 1
        rows.append({"prompt": [{"role": "user", "content": source[i]["problem"]}],
                     "completion": [{"role": "assistant", "content": text.strip()}]})
    return rows
