"""calm.training.agreement: the per-layer agreement report of a trained checkpoint."""

from __future__ import annotations

import itertools

import pytest
import torch

from calm.training import agreement_markdown, agreement_report, train
from calm.training.agreement import _auc
from training_helpers import training_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_agreement_report(training_setup, tmp_path):
    out = tmp_path / "heads"
    train(
        training_config(training_setup, out, steps=3, batch_size=8, summary_tokens=5, max_doc_tokens=40), progress=False
    )
    report = agreement_report(
        str(out), training_setup["docs"], num_docs=3, summary_tokens=5, max_doc_tokens=40, progress=False
    )
    assert report["layers"] == [1, 2, 3] and report["positions"] > 0 and report["documents"] == 3
    assert all(0 <= v <= 1 for v in report["plain"] + report["heads"])
    assert len(report["classifier"]["auc"]) == 3 and report["training"]["steps"] == 3
    md = agreement_markdown(report)
    assert "| 3 |" in md and "before" in md and "classifier AUC" in md


def test_auc_is_the_pairwise_ranking_probability():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (30,), generator=g).float()  # ties count one half
    labels = torch.rand(30, generator=g) < 0.4
    pos, neg = scores[labels].tolist(), scores[~labels].tolist()
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    assert _auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))
    assert _auc(scores, torch.zeros(30, dtype=torch.bool)) is None
