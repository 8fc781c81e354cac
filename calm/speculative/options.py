"""SpeculativeOptions: what a caller asks of lossless and speculative decoding (mode, draft layer, draft
length, context lookup, candidates). calm.speculative.lossless resolves them, with the checkpoint's stored
measurement, into the run itself (a SpeculativeConfig and its draft controller)."""

from __future__ import annotations

from dataclasses import dataclass

from calm.speculative.drafting import SpeculativeConfig


@dataclass(frozen=True)
class SpeculativeOptions:
    mode: str | None = None  # "calm", "speculative" or "lossless"; None: lossless unless exits are asked for
    draft_layer: int | None = None  # E (0: drafts from the context); None: the stored measurement's, else L/2
    max_draft: int | None = None  # k; None: the stored measurement's, else DEFAULT_MAX_DRAFT
    lookup: bool = False  # drafts looked up in the context first, else layer E's
    candidates: int | None = None  # context drafts per row verified at once as a tree; None: stored, else 1
    goodput: bool | None = None  # drafting stops per row where it does not pay; None: in lossless mode only
    twin: bool | None = None  # the model's 4-bit twin drafts where the context does not; None: the stored setting's

    @classmethod
    def running(cls, spec: SpeculativeConfig | None) -> SpeculativeOptions | None:
        """The options that ask generate() for exactly this speculative setting (None: none to run)."""
        if spec is None:
            return None
        goodput = spec.goodput or None
        return cls("speculative", spec.draft_layer, spec.max_draft, spec.lookup, spec.candidates, goodput, spec.twin)
