"""What the `calm` commands share when they run: the model, loaded with transformers' own logging and
progress bars kept quiet, and the command line as typed (recorded in reports). torch is imported
inside, on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from calm.model import CalmModel


def load_model(name: str, device: str | None, dtype: str | None, weights: str | None = None) -> CalmModel:
    """CalmModel.from_pretrained(name) without transformers' warnings and progress bars."""
    from transformers.utils import logging as hf_logging

    from calm.model import CalmModel

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return CalmModel.from_pretrained(name, device=device, dtype=dtype, weights=weights)


def command_line() -> str:
    """The command as typed (kept by calm.cli.main.CalmGroup), for the reports' machine record."""
    return str(click.get_current_context().meta.get("calm.command", "calm"))
