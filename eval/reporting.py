"""What every written report shares: the machine and command it ran on, number formats, JSON made
valid, and the atomic JSON + Markdown pair that calm bench, calm eval and benchmarks/ write."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from calm.checkpoints.checkpoint import write_atomic


def machine_info(device: torch.device | str | None = None, command: str | None = None) -> dict[str, Any]:
    """Where and how a measurement ran: platform, CPU, accelerator, library versions, command line."""
    import transformers

    device = torch.device(device) if device is not None else torch.device("cpu")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_markdown(machine: dict[str, Any]) -> list[str]:
    """Markdown lines naming the machine and the command of a report."""
    m = machine
    lines = [
        f"Machine: {m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads), device {m['device']}, "
        f"{m['platform']}, torch {m['torch']}, transformers {m['transformers']}, {m['date']}.",
        "",
    ]
    return lines + ([f"Command: `{m['command']}`", ""] if m.get("command") else [])


def json_safe(value: Any) -> Any:
    """value with every non-finite float (NaN: not measured) as None, inside dicts, lists and tuples too,
    so that it is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_speedup(value: float) -> str:
    """'1.23×', or '–' where not measured."""
    return "–" if math.isnan(value) else f"{value:.2f}×"


def format_number(value: float) -> str:
    """'1.23', or '–' where not measured."""
    return "–" if math.isnan(value) else f"{value:.2f}"


def write_json_markdown(out_dir: str | Path, stem: str, report: dict[str, Any], markdown: str) -> list[Path]:
    """stem.json and stem.md in out_dir, each written atomically."""
    out = Path(out_dir)
    files = [out / f"{stem}.json", out / f"{stem}.md"]
    write_atomic(files[0], (json.dumps(report, indent=2, default=str) + "\n").encode())
    write_atomic(files[1], markdown.encode())
    return files
