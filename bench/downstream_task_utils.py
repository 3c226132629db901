"""Scoring of the `stdlib_docline` harness task: copied as `utils.py` beside its YAML by `downstream_tasks.build`.

lm-evaluation-harness loads `process_results: !function utils.process_results` from the task's own folder, so
this file must import nothing outside the standard library. Two numbers per document, both mean-aggregated by
the harness (which also gives their standard error):

- `exact_match`: 1 when the completion, stripped, equals the rest of the docstring line, else 0;
- `word_prefix`: the share of the target's words the completion gets right, in order, before the first wrong
  one. Exact match on a whole line is rare for a small model; this credits a right start ("Return the" of
  "Return the number of items") without crediting right words in the wrong place.
"""

from __future__ import annotations


def word_prefix(prediction: str, target: str) -> float:
    """The fraction of `target`'s words that `prediction` repeats from the start, up to its first wrong word."""
    want, got = target.split(), prediction.split()
    if not want:
        return float(not got)
    right = 0
    for a, b in zip(want, got):
        if a != b:
            break
        right += 1
    return right / len(want)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The harness's per-document hook: `results[0]` is the generated completion of `doc["prompt"]`."""
    prediction, target = results[0].strip(), doc["target"].strip()
    return {"exact_match": float(prediction == target), "word_prefix": word_prefix(prediction, target)}
