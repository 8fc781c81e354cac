"""Bulk runs of `calm summarize` / `calm generate` (issue 26): one continuous batch, rows written as they finish
and in input order, an interrupted run resumes to the same output, two `accelerate launch` processes share a
file, progress lines off a terminal, and a footer about this run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DOCS, invoke, write_jsonl

MORE = DOCS + [{**d, "id": d["id"] + "2", "document": d["document"] + " . the man said"} for d in DOCS]


@pytest.fixture()
def docs(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", MORE)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def summarize(tiny_model: str, docs: Path, *extra: str):
    return invoke("summarize", docs, "--model", tiny_model, "--max-new-tokens", 6, "--batch-size", 3, *extra)


def test_a_bulk_run_is_one_continuous_batch_in_input_order(tiny_model, docs, tmp_path):
    out = tmp_path / "out.jsonl"
    result = summarize(tiny_model, docs, "--output", out)
    assert result.exit_code == 0, result.output
    written = rows(out)
    assert [r["id"] for r in written] == [d["id"] for d in MORE]
    footer = result.stderr.strip().splitlines()[-2]
    assert "8 documents" in footer and "continuous batching, 3 slots" in footer and "tokens/s" in footer
    assert "× the full model's" not in footer  # no stored rate measured at another batch size
    assert not Path(str(out) + ".partial").exists()


def test_each_row_equals_its_solo_run(tiny_model, docs, tmp_path):
    out = tmp_path / "out.jsonl"
    assert summarize(tiny_model, docs, "--output", out).exit_code == 0
    one = tmp_path / "one.jsonl"
    assert summarize(tiny_model, docs, "--output", one, "--batch-size", 1).exit_code == 0
    assert [r["summary"] for r in rows(out)] == [r["summary"] for r in rows(one)]


def test_an_interrupted_run_resumes_to_the_same_output(tiny_model, docs, tmp_path, monkeypatch):
    whole = tmp_path / "whole.jsonl"
    assert summarize(tiny_model, docs, "--output", whole).exit_code == 0
    import calm.eval.summarize as summarize_module

    real = summarize_module.summarize_documents

    def stops_after_three(*args, **kwargs):
        done = 0
        for batch in real(*args, **kwargs):
            yield batch
            done += len(batch)
            if done >= 3:
                raise KeyboardInterrupt

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(summarize_module, "summarize_documents", stops_after_three)
    stopped = summarize(tiny_model, docs, "--output", out)
    assert stopped.exit_code != 0 and "run the same command to resume" in stopped.stderr
    partial = Path(str(out) + ".partial")
    kept = rows(partial)
    assert 3 <= len(kept) < len(MORE) and not out.exists()
    with partial.open("a") as f:
        f.write('{"id": "cut by the interrup')  # a last line the interruption cut
    monkeypatch.setattr(summarize_module, "summarize_documents", real)
    resumed = summarize(tiny_model, docs, "--output", out)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming: {len(kept)} rows" in resumed.stderr
    assert f"{len(MORE) - len(kept)} documents" in resumed.stderr.strip().splitlines()[-2]
    strip = [{k: v for k, v in r.items() if k != "timings"} for r in rows(out)]
    assert strip == [{k: v for k, v in r.items() if k != "timings"} for r in rows(whole)]
    assert not partial.exists()


def test_no_resume_starts_over(tiny_model, docs, tmp_path):
    out = tmp_path / "out.jsonl"
    Path(str(out) + ".partial").write_text(json.dumps({"id": "a", "summary": "stale"}) + "\n")
    assert summarize(tiny_model, docs, "--output", out, "--no-resume").exit_code == 0
    assert rows(out)[0]["summary"] != "stale" and len(rows(out)) == len(MORE)


def test_progress_lines_off_a_terminal(tiny_model, docs, monkeypatch):
    monkeypatch.setattr("calm.eval.progress.PROGRESS_EVERY_S", 0.0)
    result = summarize(tiny_model, docs)
    lines = [line for line in result.stderr.splitlines() if line.startswith("documents: ")]
    assert lines and "documents done" in lines[-1] and f"({len(MORE)}/{len(MORE)}," in lines[-1]


def test_duplicate_ids_are_refused_with_output(tiny_model, tmp_path):
    dup = write_jsonl(tmp_path / "dup.jsonl", [DOCS[0], DOCS[0]])
    result = summarize(tiny_model, dup, "--output", tmp_path / "o.jsonl")
    assert result.exit_code != 0 and "appears twice" in result.output


@pytest.mark.slow
def test_two_accelerate_processes_share_the_file(tiny_model, docs, tmp_path):
    whole = tmp_path / "whole.jsonl"
    assert summarize(tiny_model, docs, "--output", whole).exit_code == 0
    out = tmp_path / "out.jsonl"
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher), "launch", "--num_processes", "2", "--cpu", "-m", "calm.cli.main", "summarize", str(docs)]
    command += ["--model", tiny_model, "--max-new-tokens", "6", "--batch-size", "3", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    strip = [{k: v for k, v in r.items() if k != "timings"} for r in rows(out)]
    assert strip == [{k: v for k, v in r.items() if k != "timings"} for r in rows(whole)]
    assert not list(tmp_path.glob("out.jsonl.partial*"))
