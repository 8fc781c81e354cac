"""calm.eval.reporting: what every report shares (machine, number formats, valid JSON, the atomic writer)."""

from __future__ import annotations

import json
import math

from calm.eval.reporting import (
    format_number,
    format_speedup,
    json_safe,
    machine_info,
    machine_markdown,
    write_json_markdown,
)


def test_report_files_are_written_together_as_json_and_markdown(tmp_path):
    files = write_json_markdown(tmp_path / "new", "r", {"x": 1.5}, "# r\n")
    assert [f.name for f in files] == ["r.json", "r.md"]
    assert json.loads(files[0].read_text()) == {"x": 1.5} and files[1].read_text() == "# r\n"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["r.json", "r.md"]  # no temporary left


def test_json_safe_turns_every_non_finite_float_into_null():
    report = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf, "d": (2, math.nan)}], "e": "nan", "f": 3}
    safe = json_safe(report)
    assert safe == {"a": None, "b": [1.0, None, {"c": None, "d": [2, None]}], "e": "nan", "f": 3}
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe
    assert report["a"] is not None and math.isnan(report["a"])  # the input is left alone


def test_numbers_not_measured_show_as_a_dash():
    assert format_speedup(1.234) == "1.23×" and format_speedup(math.nan) == "–"
    assert format_number(0.5) == "0.50" and format_number(math.nan) == "–"


def test_machine_info_names_the_machine_and_the_command():
    machine = machine_info("cpu", "calm bench --batch-sizes 1")
    assert machine["device"] == "cpu" and machine["command"] == "calm bench --batch-sizes 1"
    assert machine["cpu"] and machine["cpu_count"] >= 1 and machine["torch"] and machine["transformers"]
    lines = machine_markdown(machine)
    assert lines[0].startswith(f"Machine: {machine['cpu']} (") and "Command: `calm bench --batch-sizes 1`" in lines
    assert not any(line.startswith("Command") for line in machine_markdown({**machine, "command": None}))
