"""What a speculative generation did (calm.speculative.drafting): drafts, acceptance, draft and verify time."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class SpeculativeStats:
    """What a speculative generation did. A row-cycle is one row in one verification pass."""

    draft_layer: int
    max_draft: int
    cycles: int  # verification passes
    row_cycles: int  # (row, pass) pairs
    drafted: int  # tokens drafted, all rows
    accepted: int  # drafted tokens the full model kept
    draft_s: float  # wall time in the draft steps (layers 1..E and the exit head)
    verify_s: float  # wall time verifying (layers E+1..L, LM head, accept, rollback)
    context_cycles: int = 0  # passes whose drafts came from the context (lookup), all layers verified
    context_drafted: int = 0  # of `drafted`, the tokens looked up in the context
    context_accepted: int = 0  # of `accepted`, the tokens looked up in the context
    drafting_off: int = 0  # row-cycles whose drafting the goodput rule turned off (calm.speculative.goodput)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Drafted tokens kept per row per verification pass."""
        return self.accepted / self.row_cycles if self.row_cycles else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Tokens committed per row per verification pass: the kept drafts and the full model's own token."""
        return 1.0 + self.mean_accepted_length if self.row_cycles else float("nan")

    @property
    def mean_draft_length(self) -> float:
        return self.drafted / self.row_cycles if self.row_cycles else float("nan")

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "mean_draft_length": self.mean_draft_length,
            "tokens_per_step": self.tokens_per_step,
        }


class Tally:
    """Running counts for SpeculativeStats."""

    def __init__(self) -> None:
        self.cycles = self.row_cycles = self.drafted = self.accepted = 0
        self.context_cycles = self.context_drafted = self.context_accepted = 0
        self.draft_s = self.verify_s = 0.0

    def add(
        self,
        counts: torch.Tensor,
        accepted: torch.Tensor,
        live_rows: list[bool],
        seconds: tuple[float, float],
        from_context: bool,
    ) -> None:
        """One verification pass: drafted counts [B] and accepted [B], (draft, verify) wall seconds."""
        live = torch.tensor(live_rows, device=accepted.device)
        drafted, kept = int(counts[live].sum()), int(accepted[live].sum())
        self.cycles += 1
        self.row_cycles += sum(live_rows)
        self.drafted += drafted
        self.accepted += kept
        if from_context:
            self.context_cycles += 1
            self.context_drafted += drafted
            self.context_accepted += kept
        self.draft_s += seconds[0]
        self.verify_s += seconds[1]

    def stats(self, draft_layer: int, max_draft: int) -> SpeculativeStats:
        return SpeculativeStats(
            draft_layer=draft_layer,
            max_draft=max_draft,
            cycles=self.cycles,
            row_cycles=self.row_cycles,
            drafted=self.drafted,
            accepted=self.accepted,
            draft_s=self.draft_s,
            verify_s=self.verify_s,
            context_cycles=self.context_cycles,
            context_drafted=self.context_drafted,
            context_accepted=self.context_accepted,
        )
