"""`calm info`: what a model name resolves to. The backbone's architecture, where it comes from, the
exit heads, the LoRA adapter and the calibration table, read from the checkpoint's config and the
adapter's config (the heads and adapter weights are not loaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from calm.adapters import adapter_for
from calm.calibration.table import CalibrationTable
from calm.checkpoints import lora
from calm.checkpoints.checkpoint import (
    INCLUDED,
    CheckpointConfig,
    backbone_kind,
    backbone_location,
    default_checkpoint,
    is_checkpoint,
    load_heads,
    read_config,
)
from calm.checkpoints.loading import check_model_name, load_backbone
from calm.checkpoints.native import gguf_file, peak_rss_bytes, to_native, weight_bytes
from calm.engine.quantized import native_available
from calm.engine.twin import twin_bytes
from calm.errors import CheckpointError, InputError
from calm.eval.reporting import format_speedup
from calm.exits.heads import HeadsConfig
from calm.speculative.lossless import stored_setting_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTER_KEYS = ("peft_type", "r", "lora_alpha", "target_modules", "layers_to_transform", "base_model_name_or_path")
KIND_NAMES = {"alias": "calm alias", "hub": "hub id", "path": "local path", "included": "included in the checkpoint"}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    model_type: str
    model_class: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    parameters: int
    backbone: str
    backbone_kind: str
    checkpoint: str | None  # the calm checkpoint the heads and calibration come from
    heads: HeadsConfig | None = None
    calibration: CalibrationTable | None = None
    adapter: dict | None = None
    memory: tuple[tuple[str, int], ...] = ()  # (weight format, bytes resident)
    peak_rss: int = 0  # the process's peak resident memory after loading (and converting) the backbone
    lossless: str = ""  # the stored batch-1 speculative setting, described ("": none stored)


def describe(name_or_path: str | Path, device: str | torch.device | None = None) -> ModelInfo:
    """Load the backbone that `name_or_path` names and read its calm checkpoint, if it has one."""
    name = check_model_name(str(name_or_path))
    if is_checkpoint(name):
        config = read_config(name)
        model = load_backbone(backbone_location(name, config), device=device).model
        if config.heads is not None:  # a truncated heads file is an error here too, not "exit heads: ..."
            arch = adapter_for(model)
            load_heads(name, config.heads, arch.num_layers, arch.hidden_size)
        kind = config.backbone_kind or backbone_kind(config.backbone, name)
        info = _info(name, model, config.backbone, kind, Path(name), config)
        return _with_memory(info, model, backbone_location(name, config))
    checkpoint = default_checkpoint(name)
    model = load_backbone(name, device=device).model
    info = _info(
        name, model, name, backbone_kind(name), checkpoint, read_config(checkpoint) if checkpoint is not None else None
    )
    return _with_memory(info, model, name)


def _with_memory(info: ModelInfo, model: PreTrainedModel, source: str) -> ModelInfo:
    """The weights' resident bytes as loaded, and for a GGUF backbone also on its native blocks (the model
    is converted in place), with the process's peak resident memory."""
    memory = [(str(model.dtype).removeprefix("torch."), weight_bytes(model))]
    twin = twin_bytes(model) if model.device.type == "cpu" and model.dtype == torch.float32 else 0
    if twin:
        memory.append(("its 4-bit twin for lossless drafts, when they run", twin))
    gguf = gguf_file(source)
    if gguf is not None and native_available() and model.device.type == "cpu":
        try:
            to_native(model, gguf)
            memory.append(("native", weight_bytes(model)))
        except (InputError, CheckpointError) as exc:
            memory.append((f"native refused: {exc}", 0))
    return replace(info, memory=tuple(memory), peak_rss=peak_rss_bytes())


def _info(
    name: str, model: PreTrainedModel, ref: str, kind: str, checkpoint: Path | None, config: CheckpointConfig | None
) -> ModelInfo:
    arch = adapter_for(model)
    return ModelInfo(
        name=name,
        model_type=str(getattr(model.config, "model_type", "?")),
        model_class=type(model).__name__,
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        vocab_size=arch.vocab_size,
        parameters=sum(p.numel() for p in model.parameters()),
        backbone=ref,
        backbone_kind=kind,
        checkpoint=None if checkpoint is None else str(checkpoint),
        heads=config.heads if config else None,
        calibration=config.calibration if config else None,
        adapter=adapter_settings(checkpoint) if checkpoint is not None else None,
        lossless=stored_setting_text(config.extra if config else None),
    )


def adapter_settings(checkpoint: Path) -> dict | None:
    """The main settings of the checkpoint's LoRA adapter (peft's adapter_config.json), if it has one."""
    if not lora.has_adapter(checkpoint):
        return None
    file = checkpoint / lora.ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt LoRA adapter config {file}: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"corrupt LoRA adapter config {file}: not an object")
    return {key: config[key] for key in ADAPTER_KEYS if config.get(key) is not None}


# ---- text ----------------------------------------------------------------------------------------


def summary_fields(info: ModelInfo) -> list[tuple[str, str]]:
    """(field, value) rows: the model, its backbone, heads, adapter and the calibration's settings."""
    backbone = f"{info.backbone}/" if info.backbone_kind == INCLUDED else info.backbone
    rows = [
        ("model", info.name),
        (
            "architecture",
            f"{info.model_type} ({info.model_class}): {info.num_layers} layers, hidden "
            f"{info.hidden_size}, vocab {info.vocab_size}, {info.parameters / 1e6:.1f}M parameters",
        ),
        ("backbone", f"{backbone} ({KIND_NAMES.get(info.backbone_kind, info.backbone_kind)})"),
        ("checkpoint", info.checkpoint or "none (no exit heads, no calibration)"),
        ("exit heads", _heads_text(info.heads)),
        ("LoRA adapter", "none" if info.adapter is None else _mapping_text(info.adapter)),
        ("weights resident", _memory_text(info)),
        ("lossless", info.lossless or "the full model (no speculative measurement stored)"),
    ]
    floor = info.heads.min_layer if info.heads is not None else max(1, info.num_layers // 2)  # exit_floor's rule
    return rows + _calibration_fields(info.calibration, floor)


def _memory_text(info: ModelInfo) -> str:
    """Each weight format's resident bytes, and the peak while loading."""
    formats = [f"{name} {size / 1e6:.0f} MB" if size else name for name, size in info.memory]
    peak = f"; peak resident memory while loading {info.peak_rss / 1e6:.0f} MB (this process)" if info.peak_rss else ""
    return ", ".join(formats) + peak


def _heads_text(heads: HeadsConfig | None) -> str:
    if heads is None:
        return "none (exits use the model's own LM head)"
    return (
        f"layers {heads.min_layer}–{heads.num_layers - 1} of {heads.num_layers}, rank {heads.rank}, "
        f"transform {'yes' if heads.transform else 'no'}, classifier {'yes' if heads.classifier else 'no'}, "
        f"min layer {heads.min_layer}"
    )


def _mapping_text(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _calibration_fields(table: CalibrationTable | None, floor: int = 1) -> list[tuple[str, str]]:
    """The calibration's settings (its min exit layer as it applies: never below the model's exit floor,
    `floor`), the certified rows and what the knob runs."""
    if table is None:
        return [("calibration", "none (run calm calibrate; --threshold works without it)")]
    tau = "decay τ not recorded (the default decay)" if table.decay_tau is None else f"decay τ={table.decay_tau:g}"
    settings = [
        f"measure {table.measure}" if table.measure else None,
        tau,
        f"min exit layer {max(table.min_exit_layer or floor, floor)}",
        f"ε={_g(table.epsilon)}",
        f"n={table.n}",
        f"method {table.method}" if table.method else None,
        f"max new tokens {table.max_new_tokens}" if table.max_new_tokens else None,
        f"documents cut to {table.max_doc_tokens} tokens" if table.max_doc_tokens else None,
        f"data {table.data}" if table.data else None,
    ]
    certified = [("certified", _certified_text(table, "textual"))]
    if table.has_risk:
        certified.append(("certified (risk)", _certified_text(table, "risk")))
    else:
        certified.append(("certified (risk)", "no risk-consistency rows (calibrated before they existed)"))
    return [("calibration", ", ".join(item for item in settings if item)), *certified, ("knob", _knob_text(table))]


def _knob_text(table: CalibrationTable) -> str:
    """The certified thresholds --speed runs (measured faster than the full model and than every more
    careful one), or that it runs lossless."""
    if table.certified_index is None:
        return "runs the full model (nothing certified)"
    paying = [table.rows[i] for i in table.paying_indexes()]
    if not paying:
        return "no certified threshold was measured faster than the full model: --speed and --tolerance run lossless"
    runs = ", ".join(f"λ={r.threshold:g} ({format_speedup(r.speedup)})" for r in paying)
    return f"--speed 0–1 runs {runs}; certified thresholds measured slower are skipped"  # textual consistency


def _certified_text(table: CalibrationTable, consistency: str) -> str:
    """The row certified for one objective, and its loss there."""
    index = table.certified_index_for(consistency)
    if index is None:
        return f"no threshold at δ={_g(table.delta)} for {consistency} consistency (the knob runs the full model)"
    row = table.rows[index]
    loss = "D" if consistency == "textual" else "risk"
    return (
        f"λ={row.threshold:g} at δ={_g(table.delta)} (ε={_g(table.epsilon)}) for {consistency} consistency: "
        f"mean {loss} {row.mean_for(consistency):.3f}, {row.avg_layers:.2f} layers"
    )


def calibration_rows(table: CalibrationTable) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the calibration table: threshold, mean D (and risk), p-value, certified at δ."""
    header = ["λ", "mean D", "D q90", "p-value", "avg layers", "speedup"]
    if table.has_risk:
        header += ["mean risk", "risk p-value", f"certified at δ={_g(table.delta)} (risk)"]
    header.append(f"certified at δ={_g(table.delta)}" + (" (textual)" if table.has_risk else ""))
    rows = []
    for i, r in enumerate(table.rows):
        row = [
            f"{r.threshold:g}",
            f"{r.mean_loss:.3f}",
            f"{r.q90:.3f}",
            f"{r.pvalue:.3g}",
            f"{r.avg_layers:.2f}",
            format_speedup(r.speedup),
        ]
        if r.risk_mean_loss is not None and r.risk_pvalue is not None:
            row += [f"{r.risk_mean_loss:.3f}", f"{r.risk_pvalue:.3g}", _yes(table.risk_certified_index, i)]
        rows.append(row + [_yes(table.certified_index, i)])
    return header, rows


def _yes(certified: int | None, i: int) -> str:
    return "yes" if certified is not None and i <= certified else "no"


def _g(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def info_text(info: ModelInfo) -> str:
    """Plain text: one `field: value` line each, then the calibration table in Markdown."""
    lines = [f"{field}: {value}" for field, value in summary_fields(info)]
    if info.calibration is not None:
        header, rows = calibration_rows(info.calibration)
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + ":---:|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def info_tables(info: ModelInfo) -> list:
    """The same as rich tables, for a terminal."""
    from rich.table import Table

    summary = Table(show_header=False, box=None, padding=(0, 1))
    summary.add_column(style="bold")
    summary.add_column()
    for field, value in summary_fields(info):
        summary.add_row(field, value)
    tables = [summary]
    if info.calibration is not None:
        header, rows = calibration_rows(info.calibration)
        table = Table(title="calibration", title_justify="left")
        for column in header:
            table.add_column(column, justify="center" if column.startswith("certified") else "right")
        for row in rows:
            table.add_row(*row, style="green" if row[-1] == "yes" else None)
        tables.append(table)
    return tables
