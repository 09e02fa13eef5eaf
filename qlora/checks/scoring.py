"""Metrics for evaluation: pure functions on strings and numbers, no model code.

openmath: the final answer of a solution is the content of its last `\\boxed{...}`, or else its last
number; answers are compared after normalization (whitespace, `$`, thousands separators, `\\text{}`,
trailing period, numeric form: "14.0" == "14", "1/2" == "0.5").
squad: exact match and token F1 with the official SQuAD v1.1 normalization (lower case, punctuation
and the articles a/an/the removed, whitespace collapsed), maximised over the reference answers.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from fractions import Fraction
from typing import Iterable


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed), or None if there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_number(text: str) -> str | None:
    """The last number written in `text` ("-3", "1,250", "2.5"), or None."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def extract_final_answer(text: str) -> str | None:
    """The last `\\boxed{}` content, else the final number, else None."""
    boxed = last_boxed(text)
    return boxed if boxed is not None else final_number(text)


def normalize_math_answer(answer: str) -> str:
    """Canonical string form of a final answer, so equal values compare equal."""
    text = _TEXT_WRAPPER.sub(r"\1", answer.strip())
    text = _FRAC.sub(r"\1/\2", text)
    text = text.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\left", "").replace("\\right", "")
    text = re.sub(r"\s+", "", text).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return text
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def math_answer_correct(prediction: str, reference: str) -> bool:
    """Whether the final answer extracted from `prediction` equals `reference` after normalization."""
    answer = extract_final_answer(prediction)
    return answer is not None and normalize_math_answer(answer) == normalize_math_answer(str(reference))


def normalize_squad_answer(text: str) -> str:
    """SQuAD v1.1: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, references: Iterable[str]) -> float:
    """1.0 if the normalized prediction equals any normalized reference, else 0.0."""
    pred = normalize_squad_answer(prediction)
    return float(any(pred == normalize_squad_answer(ref) for ref in references))


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_squad_answer(prediction).split(), normalize_squad_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, references: Iterable[str]) -> float:
    """Token-overlap F1 between the normalized prediction and the best-matching reference."""
    return max((_f1(prediction, ref) for ref in references), default=0.0)


def perplexity(mean_loss: float | None) -> float | None:
    """exp(mean per-token cross-entropy in nats); None passes through, overflow gives inf."""
    if mean_loss is None:
        return None
    return math.exp(mean_loss) if mean_loss < 700 else math.inf
