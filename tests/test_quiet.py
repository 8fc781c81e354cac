"""calm.checkpoints.quiet: loading and saving through calm prints none of transformers' progress bars, and
leaves the user's transformers settings as they were (issue 29, item 8)."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from calm import CalmModel
from calm.checkpoints.quiet import quiet_transformers

pytestmark = pytest.mark.usefixtures("one_thread")
NOISE = ("Loading weights", "Writing model shards", "it/s]")


@pytest.fixture
def bars_on():
    verbosity = hf_logging.get_verbosity()
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()
    yield
    hf_logging.set_verbosity(verbosity)


def test_loading_and_saving_print_no_transformers_progress(tiny_model, tmp_path, capfd, bars_on):
    model = CalmModel.from_pretrained(tiny_model)
    model.save_pretrained(tmp_path / "ckpt", include_backbone=True)
    CalmModel.from_pretrained(tmp_path / "ckpt")
    err = capfd.readouterr().err
    assert not [noise for noise in NOISE if noise in err], err
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is back
    assert hf_logging.get_verbosity() == hf_logging.WARNING


def test_quiet_restores_the_settings_it_found_even_on_error(bars_on):
    hf_logging.disable_progress_bar()
    with quiet_transformers():
        assert not hf_logging.is_progress_bar_enabled()
    assert not hf_logging.is_progress_bar_enabled()  # off before: stays off
    hf_logging.enable_progress_bar()
    with pytest.raises(RuntimeError), quiet_transformers():
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        raise RuntimeError
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.WARNING
