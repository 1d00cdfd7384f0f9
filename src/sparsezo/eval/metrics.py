"""Answer metrics: SQuAD's normalisation, exact match and token F1 (max over gold answers), accuracy.

Same definitions as the official SQuAD v1.1 script (which MeZO uses for SQuAD and DROP):
answers are compared after lower-casing and removing punctuation, the articles a/an/the and
extra whitespace, so "The Cat!" matches "cat". An empty prediction scores 0 against any answer
that does not normalise to nothing.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the normalised prediction equals some normalised gold answer."""
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: list[str]) -> float:
    """Best bag-of-tokens F1 of the prediction against any gold answer."""
    return max((_f1(prediction, a) for a in answers), default=0.0)


def accuracy(predictions: list[int], golds: list[int]) -> float:
    return sum(p == g for p, g in zip(predictions, golds, strict=True)) / len(golds)
