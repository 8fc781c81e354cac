"""A point of the threshold sweep (calm.eval.sweep): one column of the report (calm.eval.report)."""

from __future__ import annotations

from dataclasses import dataclass

from calm.exits.policy import ExitPolicy
from calm.speculative.drafting import SpeculativeConfig


@dataclass(frozen=True)
class Point:
    """One column of the sweep: a name (also its cache file), a label, and how it generates."""

    name: str
    label: str
    threshold: float | None = None
    policy: ExitPolicy | None = None  # None: transformers generate
    speculative: SpeculativeConfig | None = None  # the policy is then the draft controller (lossless)
    kind: str = "adaptive"  # full, adaptive, static, lossless, speculative or transformers (plots' series)
    alias: str | None = None  # the outputs are this other point's (a lossless run that is the full model)
