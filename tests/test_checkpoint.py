import json
import os
import stat

import pytest

from calm.checkpoint import CONFIG_FILE, CheckpointConfig, read_config, save_checkpoint, write_atomic
from calm.errors import CheckpointError
from calm.heads import ExitHeads, HeadsConfig


def test_write_atomic_replaces_whole_files_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "f.json"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert list(target.parent.iterdir()) == [target]                      # no temporary file left behind
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_config_round_trip(tmp_path):
    heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=8, rank=2, min_layer=2))
    save_checkpoint(tmp_path, CheckpointConfig(backbone="smollm2", heads=heads.config, calibration={"rows": []},
                                               extra={"steps": 3}), heads)
    config = read_config(tmp_path)
    assert config.backbone == "smollm2" and config.heads == heads.config
    assert config.calibration == {"rows": []} and config.extra == {"steps": 3}


@pytest.mark.parametrize("content, message", [
    ("[]", "not a calm checkpoint config"), (json.dumps({"format": "calm-checkpoint", "version": 1}), "no backbone"),
    (json.dumps({"format": "calm-checkpoint", "version": 1, "backbone": "x", "heads": {"bogus": 1}}), "bad heads"),
])
def test_bad_configs(tmp_path, content, message):
    (tmp_path / CONFIG_FILE).write_text(content)
    with pytest.raises(CheckpointError, match=message):
        read_config(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_config(tmp_path / "nope")
