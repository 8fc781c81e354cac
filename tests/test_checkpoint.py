import json
import os
import stat
from pathlib import Path

import pytest

import calm
from calm import training
from calm.calibration.table import CalibrationRow, CalibrationTable
from calm.checkpoints.checkpoint import (
    CONFIG_FILE,
    CheckpointConfig,
    backbone_kind,
    backbone_location,
    name_backbone,
    read_config,
    save_backbone,
    save_checkpoint,
    write_atomic,
)
from calm.errors import CheckpointError
from calm.exits.heads import ExitHeads, HeadsConfig


def test_write_atomic_replaces_whole_files_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "f.json"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert list(target.parent.iterdir()) == [target]  # no temporary file left behind
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def table(**settings) -> CalibrationTable:
    rows = tuple(
        CalibrationRow(t, loss, 0.0, loss, loss, layers, 1.0, 0.01)
        for t, loss, layers in ((0.9, 0.01, 4.0), (0.5, 0.2, 2.0))
    )
    return CalibrationTable(rows, certified_index=0, delta=0.1, epsilon=0.05, n=50, method="hb", **settings)


def test_config_round_trip(tmp_path):
    heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=8, rank=2, min_layer=2))
    calibration = table(measure="state", decay_tau=0.0, min_exit_layer=2)
    save_checkpoint(
        tmp_path,
        CheckpointConfig(backbone="smollm2", heads=heads.config, calibration=calibration, extra={"steps": 3}),
        heads,
    )
    config = read_config(tmp_path)
    assert config.backbone == "smollm2" and config.heads == heads.config and config.backbone_kind == "alias"
    assert config.calibration == calibration and config.extra == {"steps": 3}
    stored = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert stored["calibration"] == calibration.to_dict() and stored["calibration"]["measure"] == "state"


def test_the_shipped_config_reads_as_a_typed_table_and_writes_back_the_same_dict(tmp_path):
    shipped = Path(calm.__file__).parent / "assets" / "smollm2"
    config = read_config(shipped)
    table = config.calibration
    assert isinstance(table, CalibrationTable) and config.backbone_kind == "alias"
    assert (table.measure, table.decay_tau, table.certified_threshold, table.n) == ("classifier", 0.0, 0.97, 120)
    original = json.loads((shipped / CONFIG_FILE).read_text())
    assert config.to_dict()["calibration"] == original["calibration"]
    save_checkpoint(tmp_path, config, None)
    assert {k: v for k, v in json.loads((tmp_path / CONFIG_FILE).read_text()).items() if k != "backbone_kind"} == {
        k: v for k, v in original.items()
    }


def test_a_table_without_settings_keeps_its_old_dict_form():
    assert set(table().to_dict()) == {"format", "version", "certified_index", "delta", "epsilon", "n", "method", "rows"}
    assert table().decay_tau is None and table().measure is None


@pytest.mark.parametrize(
    "calibration, message",
    [
        ({"rows": []}, "at least one row"),
        ([1, 2], "expected an object"),
        ({**table().to_dict(), "decay_tau": -1}, "decay_tau"),
        ({**table().to_dict(), "min_exit_layer": 0}, "min_exit_layer"),
    ],
)
def test_an_unreadable_calibration_table_is_a_checkpoint_error(tmp_path, calibration, message):
    data = {"format": "calm-checkpoint", "version": 1, "backbone": "smollm2", "calibration": calibration}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"calibration table.*{message}|{message}.*calm calibrate"):
        read_config(tmp_path)


def test_backbone_kinds(tmp_path):
    (tmp_path / "ckpt" / "backbone").mkdir(parents=True)
    (tmp_path / "local").mkdir()
    ckpt = tmp_path / "ckpt"
    assert backbone_kind("smollm2", ckpt) == "alias"
    assert backbone_kind("HuggingFaceTB/SmolLM2-135M", ckpt) == "hub"
    assert backbone_kind("backbone", ckpt) == "included"
    assert backbone_kind(str(tmp_path / "local"), ckpt) == "path"
    assert backbone_kind("/no/such/dir", ckpt) == "path"
    assert name_backbone(str(ckpt / "backbone"), ckpt) == "backbone"
    assert name_backbone(str(tmp_path / "local"), ckpt) == str((tmp_path / "local").resolve())
    assert name_backbone("HuggingFaceTB/SmolLM2-135M", ckpt) == "HuggingFaceTB/SmolLM2-135M"


def test_an_included_backbone_must_be_there(tmp_path):
    with pytest.raises(CheckpointError, match="included in backbone/"):
        save_checkpoint(tmp_path, CheckpointConfig(backbone="backbone", backbone_kind="included"))
    assert not (tmp_path / CONFIG_FILE).exists()  # the config is written last, or not at all
    (tmp_path / CONFIG_FILE).write_text(
        json.dumps({"format": "calm-checkpoint", "version": 1, "backbone": "backbone", "backbone_kind": "included"})
    )
    with pytest.raises(CheckpointError, match="config.json is missing"):
        backbone_location(tmp_path, read_config(tmp_path))


def test_save_backbone_replaces_the_directory_atomically(tmp_path, llama):
    target = tmp_path / "backbone"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_backbone(llama, None, target)
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert not (target / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["backbone"]
    assert training._save_backbone is save_backbone  # training saves its backbone the same way


@pytest.mark.parametrize(
    "content, message",
    [
        ("[]", "not a calm checkpoint config"),
        (json.dumps({"format": "calm-checkpoint", "version": 1}), "no backbone"),
        (json.dumps({"format": "calm-checkpoint", "version": 1, "backbone": "x", "heads": {"bogus": 1}}), "bad heads"),
        (
            json.dumps({"format": "calm-checkpoint", "version": 1, "backbone": "x", "backbone_kind": "ftp"}),
            "backbone_kind",
        ),
    ],
)
def test_bad_configs(tmp_path, content, message):
    (tmp_path / CONFIG_FILE).write_text(content)
    with pytest.raises(CheckpointError, match=message):
        read_config(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_config(tmp_path / "nope")
