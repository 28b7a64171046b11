"""The official SQuAD v1.1 metrics (``evaluate_v1.1.py``), to the last bit of the float.

Contract: answers are normalized (lower case, punctuation of ``string.punctuation`` removed, the
articles a/an/the removed as whole words, whitespace collapsed); per question the prediction's exact
match and token F1 are the maxima over its ground truths; questions without a prediction score 0 and
still count in the denominator. The sums run in dataset order with the same float operations as the
official script, so :func:`evaluate` returns the very floats it would print.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

_DROP_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower, drop punctuation, drop articles, collapse whitespace (in the official order)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_DROP_PUNCT)).split())


def _f1_normalized(pred: str, truth: str) -> float:
    """Token F1 of two normalized answers (the official formula, with exact fast paths)."""
    if pred == truth and pred:
        return 1.0   # precision = recall = 1.0 exactly
    pred_tokens, truth_tokens = pred.split(), truth.split()
    if set(pred_tokens).isdisjoint(truth_tokens):
        return 0
    same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0
    precision = 1.0 * same / len(pred_tokens)
    recall = 1.0 * same / len(truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def f1_score(prediction: str, truth: str) -> float:
    return _f1_normalized(normalize_answer(prediction), normalize_answer(truth))


def question_scores(question_ids: Sequence[str], truths: Sequence[Sequence[str]],
                    predictions: Mapping[str, str]) -> tuple[list[bool], list[float]]:
    """Per question (dataset order): exact match and F1, each the max over its ground truths;
    False / 0 for a question without prediction (the official crashes on one without answers)."""
    exact: list[bool] = []
    f1: list[float] = []
    for qid, answers in zip(question_ids, truths, strict=True):
        if qid not in predictions or not answers:
            exact.append(False)
            f1.append(0)
            continue
        pred = normalize_answer(predictions[qid])
        norm = [normalize_answer(t) for t in answers]
        exact.append(max(pred == t for t in norm))
        f1.append(max(_f1_normalized(pred, t) for t in norm))
    return exact, f1


def aggregate(exact: Sequence[bool], f1: Sequence[float]) -> dict[str, float]:
    """``{"exact_match": %, "f1": %}``: the official sums (bools into an int, floats left to right;
    ``sum()`` is avoided as Python 3.12+ compensates float sums) scaled by the question count."""
    if not exact:
        raise ValueError("no questions to evaluate")
    f1_sum = 0.0
    for value in f1:
        f1_sum += value
    return {"exact_match": 100.0 * int(sum(exact)) / len(exact), "f1": 100.0 * f1_sum / len(f1)}


def evaluate(question_ids: Sequence[str], truths: Sequence[Sequence[str]],
             predictions: Mapping[str, str]) -> dict[str, float]:
    """``{"exact_match": %, "f1": %}`` over every question of the dataset (in dataset order)."""
    return aggregate(*question_scores(question_ids, truths, predictions))


def official_line(metrics: Mapping[str, float]) -> str:
    """The one line ``evaluate_v1.1.py`` prints: ``json.dumps`` of the dict, key order kept."""
    return json.dumps({"exact_match": metrics["exact_match"], "f1": metrics["f1"]})
