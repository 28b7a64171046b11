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


def exact_match_score(prediction: str, truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(truth)


def evaluate(question_ids: Sequence[str], truths: Sequence[Sequence[str]],
             predictions: Mapping[str, str]) -> dict[str, float]:
    """``{"exact_match": %, "f1": %}`` over every question of the dataset (in dataset order)."""
    f1 = 0.0
    total = exact = 0
    for qid, answers in zip(question_ids, truths, strict=True):
        total += 1
        if qid not in predictions or not answers:
            continue  # unanswered: scores 0 but counts in total (the official crashes on no answers)
        pred = normalize_answer(predictions[qid])
        norm = [normalize_answer(t) for t in answers]
        exact += max(pred == t for t in norm)   # bools summed into an int
        f1 += max(_f1_normalized(pred, t) for t in norm)
    if total == 0:
        raise ValueError("no questions to evaluate")
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def official_line(metrics: Mapping[str, float]) -> str:
    """The one line ``evaluate_v1.1.py`` prints: ``json.dumps`` of the dict, key order kept."""
    return json.dumps({"exact_match": metrics["exact_match"], "f1": metrics["f1"]})
