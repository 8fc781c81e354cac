"""ROUGE F1 with rouge-score (stemmed), as in the CALM paper's summarisation results, and CALM's two
consistency losses: textual, 1 − ROUGE-L(early, full), and risk, max(0, R_full − R_early) with R the
ROUGE-L F1 against the references."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from statistics import fmean

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


def rouge_l_references(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 of a prediction against its references: the mean over them where there are several."""
    if not references:
        raise ValueError("rouge_l_references needs at least one reference")
    scorer = _scorer(("rougeL",))
    return fmean(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def textual_loss(early: str, full: str) -> float:
    """Textual inconsistency D = 1 − ROUGE-L(early, full), in [0, 1]."""
    return 1.0 - rouge_l_similarity(early, full)


def risk_loss(early: str, full: str, references: Sequence[str]) -> float:
    """Risk inconsistency max(0, R_full − R_early), R = ROUGE-L F1 against the references; clipped at 0 so
    it lies in [0, 1] (an early output better than the full one costs nothing, and earns nothing)."""
    if early.strip() == full.strip():
        return 0.0
    return max(0.0, rouge_l_references(full, references) - rouge_l_references(early, references))
