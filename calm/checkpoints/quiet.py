"""transformers' own progress bars and info logs ("Loading weights: 100%|…", "Writing model shards") kept
quiet while calm loads or saves a model, and put back as they were afterwards: the user's own transformers
calls in the same process keep their bars. calm shows its own progress where a step is slow."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bar and only its errors inside the block (also a decorator)."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
