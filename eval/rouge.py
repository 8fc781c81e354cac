"""ROUGE F1 with rouge-score (stemmed), as in the CALM paper's summarisation results."""

from __future__ import annotations

from functools import lru_cache

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=2)
def _scorer(types: tuple[str, ...]):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(types), use_stemmer=True)


def rouge_f1(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 in [0, 1] of a prediction against a reference."""
    scores = _scorer(ROUGE_TYPES).score(reference, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def rouge_l_similarity(a: str, b: str) -> float:
    """ROUGE-L F1 between two outputs; 1 when they are the same text (also when both are empty)."""
    if a.strip() == b.strip():
        return 1.0
    return _scorer(("rougeL",)).score(b, a)["rougeL"].fmeasure
