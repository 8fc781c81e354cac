"""calm.cli.info and `calm info`: the backbone, its source, the heads, the adapter and the calibration table."""

import json

import pytest
from rich.console import Console

from calm.calibration.table import CalibrationRow, CalibrationTable
from calm.checkpoints import lora
from calm.checkpoints.checkpoint import CONFIG_FILE, CheckpointConfig, save_checkpoint
from calm.cli.info import describe, info_tables, info_text
from calm.exits.heads import ExitHeads, HeadsConfig
from calm.model import CalmModel
from helpers import assert_clean_error, invoke

pytestmark = pytest.mark.usefixtures("one_thread")


def make_table() -> CalibrationTable:
    rows = tuple(
        CalibrationRow(
            threshold=t, mean_loss=loss, q50=0.0, q90=loss, q95=loss, avg_layers=layers, speedup=4 / layers, pvalue=p
        )
        for t, loss, layers, p in ((0.9, 0.01, 4.0, 1e-5), (0.5, 0.05, 3.0, 0.004), (0.0, 0.6, 1.0, 1.0))
    )
    return CalibrationTable(
        rows,
        certified_index=1,
        delta=0.1,
        epsilon=0.05,
        n=200,
        method="hb",
        measure="classifier",
        decay_tau=0.0,
        min_exit_layer=2,
        max_new_tokens=32,
        data="calib.jsonl",
    )


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("info") / "ckpt"
    model = CalmModel.from_pretrained(tiny_model)
    model.heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=64, rank=8, min_layer=2))
    model.calibration = make_table()
    model.save_pretrained(path, include_backbone=True)
    return path


def test_a_plain_transformers_model(tiny_model):
    info = describe(tiny_model)
    assert (info.model_type, info.model_class, info.num_layers, info.hidden_size) == (
        "llama",
        "LlamaForCausalLM",
        4,
        64,
    )
    assert info.backbone_kind == "path" and info.checkpoint is None and info.heads is None and info.calibration is None
    text = info_text(info)
    assert "exit heads: none" in text and "calibration: none" in text and "LoRA adapter: none" in text
    assert f"backbone: {tiny_model} (local path)" in text


def test_a_checkpoint_with_its_backbone_heads_and_calibration(checkpoint):
    info = describe(checkpoint)
    assert info.backbone_kind == "included" and info.heads.rank == 8 and info.calibration == make_table()
    assert info.parameters == sum(p.numel() for p in CalmModel.from_pretrained(checkpoint).model.parameters())
    lines = info_text(info).splitlines()
    assert "backbone: backbone/ (included in the checkpoint)" in lines
    assert "exit heads: layers 2–3 of 4, rank 8, transform yes, classifier yes, min layer 2" in lines
    assert any(
        line.startswith("calibration: measure classifier, decay τ=0, min exit layer 2, ε=0.05, n=200") for line in lines
    )
    assert "certified: λ=0.5 at δ=0.1 (ε=0.05) for textual consistency: mean D 0.050, 3.00 layers" in lines
    assert "certified (risk): no risk-consistency rows (calibrated before they existed)" in lines
    table = lines[lines.index("| λ | mean D | D q90 | p-value | avg layers | speedup | certified at δ=0.1 |") :]
    assert table[2:] == [
        "| 0.9 | 0.010 | 0.010 | 1e-05 | 4.00 | 1.00× | yes |",
        "| 0.5 | 0.050 | 0.050 | 0.004 | 3.00 | 1.33× | yes |",
        "| 0 | 0.600 | 0.600 | 1 | 1.00 | 4.00× | no |",
    ]


def test_a_lora_adapter_is_shown(tiny_model, tmp_path):
    save_checkpoint(tmp_path, CheckpointConfig(backbone=tiny_model))
    (tmp_path / lora.ADAPTER_CONFIG).write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "lora_dropout": 0.0})
    )
    assert "LoRA adapter: peft_type=LORA, r=8, lora_alpha=16, target_modules=['q_proj']" in info_text(
        describe(tmp_path)
    )
    (tmp_path / lora.ADAPTER_CONFIG).write_text("{")
    assert_clean_error(invoke("info", tmp_path), "corrupt LoRA adapter config")


def test_the_rich_tables_say_the_same(checkpoint):
    console = Console(record=True, width=200, force_terminal=True)
    for table in info_tables(describe(checkpoint)):
        console.print(table)
    text = console.export_text()
    assert "included in the checkpoint" in text and "certified at δ=0.1" in text
    assert "0.004" in text and "1.33×" in text


def test_calm_info(checkpoint):
    result = invoke("info", checkpoint)
    assert result.exit_code == 0, result.output
    assert "certified: λ=0.5 at δ=0.1" in result.output and "| 0.9 | 0.010 |" in result.output
    assert "exit heads: layers 2–3 of 4" in result.output


def test_calm_info_bad_input(tmp_path):
    assert_clean_error(invoke("info", tmp_path / "nope"), "unknown model")
    (tmp_path / CONFIG_FILE).write_text(
        json.dumps({"format": "calm-checkpoint", "version": 1, "backbone": "x", "calibration": {"rows": []}})
    )
    assert_clean_error(invoke("info", tmp_path), "unreadable calibration table")


def test_info_shows_the_min_exit_layer_that_applies_and_what_the_knob_runs(checkpoint):
    # issue 29, items 2 and 3: it printed the calibration's min exit layer 1 beside the heads' "min layer 10"
    from dataclasses import replace

    info = describe(checkpoint)
    table = replace(info.calibration, min_exit_layer=1)
    lines = info_text(replace(info, calibration=table)).splitlines()
    calibration = next(line for line in lines if line.startswith("calibration:"))
    assert "min exit layer 2," in calibration and "min exit layer 1" not in calibration
    assert "knob: --speed 0–1 runs λ=0.5 (1.33×); certified thresholds measured slower are skipped" in lines
    slow = replace(table, rows=tuple(replace(r, speedup=0.95) for r in table.rows))
    assert "knob: no certified threshold was measured faster than the full model: --speed and --tolerance run " in (
        info_text(replace(info, calibration=slow))
    )
