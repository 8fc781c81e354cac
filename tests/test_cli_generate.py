"""`calm summarize` (prompt template, truncation report, --output, sampling, --decay-tau) and `calm generate`,
on the tiny random Llama (context 256) with a word-level tokenizer."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest

from calm.calibration.table import CalibrationRow, CalibrationTable
from calm.checkpoints.checkpoint import CheckpointConfig, save_checkpoint
from calm.cli.knobs import Knobs, sampling_config
from calm.errors import InputError
from calm.exits.policy import ExitPolicy
from calm.model import CalmModel
from helpers import DOCS, assert_clean_error, invoke, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = {"id": "long", "document": " ".join(["the cat sat on the mat ."] * 100)}  # 700 tokens


@pytest.fixture
def docs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", DOCS[:2] + [LONG])


def json_rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


# ---- truncation --------------------------------------------------------------------------------


def test_a_cut_document_is_reported(tiny_model, docs_file):
    result = invoke("summarize", "--model", tiny_model, docs_file, "--json", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in json_rows(result.stdout)}
    assert [rows[i]["truncated"] for i in ("a", "b", "long")] == [False, False, True]
    assert rows["long"]["document_tokens"] == 700 and rows["long"]["kept_tokens"] < 256
    kept = rows["long"]["kept_tokens"]
    assert f"warning: document long: kept the first {kept} of 700 tokens" in result.stderr.splitlines()
    assert result.stderr.count("kept the first") == 1


def test_no_truncate_refuses_before_generating(tiny_model, docs_file):
    result = invoke("summarize", "--model", tiny_model, docs_file, "--no-truncate", "--max-new-tokens", 4)
    assert_clean_error(result, "document long has 700 tokens", "drop --no-truncate")
    assert result.stdout == ""  # nothing was summarised before the error
    assert_clean_error(
        invoke("summarize", "--model", tiny_model, docs_file, "--no-truncate", "--max-doc-tokens", 5),
        "give one of them",
    )


def test_max_doc_tokens_is_a_cut_asked_for(tiny_model, docs_file):
    result = invoke(
        "summarize", "--model", tiny_model, docs_file, "--json", "--max-new-tokens", 3, "--max-doc-tokens", 5
    )
    assert result.exit_code == 0, result.output
    assert all(r["truncated"] and r["kept_tokens"] == 5 for r in json_rows(result.stdout))
    assert "kept the first" not in result.stderr


# ---- the prompt template --------------------------------------------------------------------------


def test_prompt_template(tiny_model, tmp_path):
    model = CalmModel.from_pretrained(tiny_model)
    expected = model.generate("the cat sat on the mat . Summarize", max_new_tokens=5).texts[0]
    result = invoke(
        "summarize",
        "--model",
        tiny_model,
        "--text",
        "  the cat sat on the mat ",
        "--max-new-tokens",
        5,
        "--prompt",
        "{document} . Summarize",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected
    assert_clean_error(
        invoke("summarize", "--model", tiny_model, "--text", "x", "--prompt", "Summarize:"), "--prompt", "{document}"
    )


# ---- --output ------------------------------------------------------------------------------------


def test_output_file_holds_the_json_rows(tiny_model, docs_file, tmp_path):
    out = tmp_path / "summaries.jsonl"
    out.write_text("old\n")
    result = invoke(
        "summarize",
        "--model",
        tiny_model,
        docs_file,
        "--json",
        "--output",
        out,
        "--max-new-tokens",
        4,
        "--batch-size",
        2,
    )
    assert result.exit_code == 0, result.output
    assert json_rows(out.read_text()) == json_rows(result.stdout)
    row = json_rows(out.read_text())[0]
    assert set(row) >= {"id", "summary", "exit_layers", "avg_layers", "truncated", "timings"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("summaries")] == ["summaries.jsonl"]
    assert_clean_error(
        invoke("summarize", "--model", tiny_model, docs_file, "--output", tmp_path / "no" / "x.jsonl"),
        "--output",
        "does not exist",
    )
    assert_clean_error(invoke("summarize", "--model", tiny_model, docs_file, "--output", tmp_path), "is a directory")


def test_output_is_atomic_and_keeps_the_rows_of_an_interrupted_run(tmp_path):
    from calm.eval.bulk_output import BulkOutput

    target = tmp_path / "out.jsonl"
    target.write_text("previous run\n")
    out = BulkOutput(target)
    out.write({"id": "a"})
    out.close()  # the run stopped here
    assert target.read_text() == "previous run\n"  # untouched until the run completes
    assert json_rows((tmp_path / "out.jsonl.partial").read_text()) == [{"id": "a"}]
    out = BulkOutput(target)
    assert out.done == {"a"}
    out.write({"id": "b"})
    out.close()
    assert out.merge(["b", "a"]) == 2
    assert json_rows(target.read_text()) == [{"id": "b"}, {"id": "a"}]  # in input order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no partial or temporary left


def test_ctrl_c_exits_130_and_says_where_the_partial_rows_are(tiny_model, docs_file, tmp_path, monkeypatch):
    # issue 29, item 7: Ctrl-C exited 1 with click's "Aborted!"
    from calm.eval import summarize as summarize_module

    real = summarize_module.summarize_documents

    def interrupted(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 1:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(summarize_module, "summarize_documents", interrupted)
    out = tmp_path / "rows.jsonl"
    args = ["--json", "--output", out, "--max-new-tokens", 2, "--batch-size", 1]
    result = invoke("summarize", "--model", tiny_model, docs_file, *args)
    assert result.exit_code == 130, result.output
    assert "Aborted!" not in result.output
    assert f"the 1 rows written so far are in {out}.partial" in result.output
    assert not out.exists() and len(json_rows((tmp_path / "rows.jsonl.partial").read_text())) == 1


# ---- sampling ------------------------------------------------------------------------------------


def test_sampling_options(tiny_model):
    def run(*extra):
        result = invoke(
            "summarize",
            "--model",
            tiny_model,
            "--text",
            DOCS[0]["document"],
            "--max-new-tokens",
            8,
            "--do-sample",
            *extra,
        )
        assert result.exit_code == 0, result.output
        return result.stdout

    assert run("--seed", "3", "--temperature", "2") == run("--seed", "3", "--temperature", "2")
    assert len({run("--seed", str(s), "--temperature", "5") for s in range(4)}) > 1
    greedy = invoke("summarize", "--model", tiny_model, "--text", DOCS[0]["document"], "--max-new-tokens", 8).stdout
    assert run("--top-k", "1", "--seed", "0") == greedy  # top-1 sampling is greedy


@pytest.mark.parametrize("option", ["--temperature", "--top-p", "--top-k", "--seed"])
def test_sampling_options_need_do_sample(tiny_model, option):
    result = invoke("summarize", "--model", tiny_model, "--text", "the cat", option, "1")
    assert_clean_error(result, option, "--do-sample")
    with pytest.raises(InputError, match="--top-p, --seed only apply when sampling"):
        sampling_config(False, None, 0.9, None, 1)


# ---- --decay-tau and the calibrated knob -------------------------------------------------------


def calibrated(tiny_model: str, path: Path, decay_tau: float | None) -> str:
    rows = [
        CalibrationRow(
            threshold=t, mean_loss=loss, q50=loss, q90=loss, q95=loss, avg_layers=layers, speedup=4 / layers, pvalue=0.0
        )
        for t, loss, layers in ((0.9, 0.01, 4.0), (0.5, 0.05, 3.0), (0.0, 0.6, 1.0))
    ]
    table = CalibrationTable(
        tuple(rows), certified_index=1, delta=0.1, epsilon=0.1, n=200, method="hb", decay_tau=decay_tau
    )
    save_checkpoint(path, CheckpointConfig(backbone=tiny_model, calibration=table), heads=None)
    return str(path)


def test_threshold_with_decay_tau_0_is_the_calibrated_speed_1(tiny_model, tmp_path):
    model = CalmModel.from_pretrained(calibrated(tiny_model, tmp_path / "c", decay_tau=0.0))
    by_speed = Knobs(speed=1.0).resolve(model).policy
    by_threshold = Knobs(threshold=0.5, decay_tau=0.0).resolve(model)
    assert by_speed == by_threshold.policy == ExitPolicy(measure="softmax", threshold=0.5, decay_tau=0.0)
    assert by_threshold.description == "from --threshold"
    assert Knobs(threshold=0.5).resolve(model).policy.decay_tau == ExitPolicy.decay_tau  # CALM's τ unless given
    assert Knobs(speed=1.0, decay_tau=0.0).resolve(model).policy == by_speed  # the certified τ: allowed
    with pytest.raises(InputError, match="certifies its thresholds under the decay τ=0"):
        Knobs(speed=1.0, decay_tau=4.0).resolve(model)


def test_decay_tau_on_the_command_line(tiny_model, tmp_path):
    model = calibrated(tiny_model, tmp_path / "c", decay_tau=None)  # an old table: τ=4
    text = ("--text", "the cat sat", "--max-new-tokens", "3")
    speed = invoke("summarize", "--model", model, *text, "--speed", "1")
    threshold = invoke("summarize", "--model", model, *text, "--threshold", "0.5", "--decay-tau", "4")
    assert speed.exit_code == threshold.exit_code == 0
    assert speed.stdout == threshold.stdout
    assert "policy: softmax λ=0.5, λ decays to 0.453 by token 3 (τ=4)" in speed.stderr
    assert_clean_error(
        invoke("summarize", "--model", model, *text, "--speed", "1", "--decay-tau", "0"),
        "certifies its thresholds under the decay τ=4",
    )
    assert_clean_error(invoke("summarize", "--model", tiny_model, *text, "--decay-tau", "0"), "give --threshold")


# ---- calm generate -----------------------------------------------------------------------------


def test_generate(tiny_model):
    model = CalmModel.from_pretrained(tiny_model)
    expected = model.generate(["the cat sat", "a dog ran in the park"], max_new_tokens=5).texts
    result = invoke("generate", "--model", tiny_model, "the cat sat", "a dog ran in the park", "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"[1] {expected[0]}", f"[2] {expected[1]}"]
    assert result.stderr.startswith("2 prompts, avg layers 4.00 of 4")

    result = invoke(
        "generate",
        "--model",
        tiny_model,
        "-",
        "--json",
        "--threshold",
        "0",
        "--measure",
        "state",
        "--max-new-tokens",
        4,
        input="the cat sat\n",
    )
    assert result.exit_code == 0, result.output
    (row,) = json_rows(result.stdout)
    assert row["exit_layers"][1:] == [2, 2, 2] and row["truncated"] is False
    assert "policy: state λ=0, λ decays to 0 by token 4 (τ=4); from --threshold" in result.stderr


def test_generate_refuses_a_prompt_too_long(tiny_model):
    assert_clean_error(invoke("generate", "--model", tiny_model, LONG["document"]), "the prompt has 700 tokens")
    assert_clean_error(invoke("generate", "--model", tiny_model, "-", input="  \n"), "empty prompt")


# ---- output on a terminal ----------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_summaries_go_to_stdout_while_the_bar_is_on_a_terminal(tiny_model, tmp_path, monkeypatch):
    """With stderr on a terminal, the bar used to redirect stdout to itself: `> file` got nothing."""
    from calm.cli.main import cli

    master, slave = os.openpty()
    drain = threading.Thread(target=_drain, args=(master,), daemon=True)
    drain.start()
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    with os.fdopen(slave, "w") as terminal, open(tmp_path / "out.txt", "w") as stdout:
        monkeypatch.setattr(sys, "stderr", terminal)
        monkeypatch.setattr(sys, "stdout", stdout)
        cli.main(
            ["summarize", str(data), "--model", tiny_model, "--max-new-tokens", "3", "--batch-size", "1"],
            standalone_mode=False,
        )
    drain.join(timeout=10)
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert [line.split(" ")[0] for line in lines] == ["[a]", "[b]", "[c]", "[d]"]


def _drain(fd: int) -> None:
    """Read a pseudo-terminal until it closes, so that writes to it never block."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- the shipped model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_model_threshold_0_99_with_tau_0_is_speed_1():
    """The shipped calibration certifies classifier λ 0.99, 0.98, 0.97 with a fixed λ, measured at 1.09×, 0.99×
    and 0.90×: --speed 1 runs the fastest of them, 0.99, exactly (issue 29, item 2)."""
    model = CalmModel.from_pretrained("smollm2")
    assert model.calibration.decay_tau == 0.0
    by_speed = Knobs(speed=1.0).resolve(model).policy
    by_threshold = Knobs(threshold=0.99, decay_tau=0.0).resolve(model).policy
    assert by_speed == by_threshold == ExitPolicy(measure="classifier", threshold=0.99, decay_tau=0.0)
    text = ("--text", "The council approved a plan to build three new schools over five years.", "--max-new-tokens", 8)
    speed = invoke("summarize", *text, "--speed", "1", "--json")
    threshold = invoke("summarize", *text, "--threshold", "0.99", "--decay-tau", "0", "--json")
    assert speed.exit_code == threshold.exit_code == 0, speed.output + threshold.output
    (a,), (b,) = json_rows(speed.stdout), json_rows(threshold.stdout)
    assert (a["summary"], a["exit_layers"]) == (b["summary"], b["exit_layers"])
    assert "policy: classifier λ=0.99, λ fixed (τ=0); from --speed 1 and the calibration" in speed.stderr
    assert "policy: classifier λ=0.99, λ fixed (τ=0); from --threshold" in threshold.stderr


# ---- issue 20: finish_reason (item 12), generate's text field (item 13) ---------------------------------


def test_finish_reason_says_which_rows_hit_max_new_tokens(tiny_model):
    model = CalmModel.from_pretrained(tiny_model)
    result = model.generate(["the cat sat", "a dog ran in the park"], max_new_tokens=5)
    eos = set(model.eos_token_ids)
    expected = tuple("stop" if ids[-1] in eos else "length" for ids in result.token_ids)
    assert result.finish_reasons == expected and len(expected) == 2
    assert all(reason == "stop" for ids, reason in zip(result.token_ids, expected) if len(ids) < 5)
    assert result.to_dict()["finish_reasons"] == list(expected)
    cut = invoke("generate", "--model", tiny_model, "the cat sat", "--max-new-tokens", 1, "--json")
    (row,) = json_rows(cut.stdout)
    assert row["finish_reason"] == "length"
    assert '1 of 1 output stopped at --max-new-tokens 1 (finish_reason "length"' in cut.stderr


def test_generate_writes_text_and_summarize_writes_summary(tiny_model):
    row = json_rows(invoke("generate", "--model", tiny_model, "the cat", "--max-new-tokens", 2, "--json").stdout)[0]
    assert "text" in row and "summary" not in row
    doc = invoke("summarize", "--model", tiny_model, "--text", "the cat sat", "--max-new-tokens", 2, "--json")
    assert "summary" in json_rows(doc.stdout)[0]


def test_summarize_default_budget_holds_95_percent_of_the_measured_first_sentences():
    # issue 29, item 4: the default comes from benchmarks/results/summary_length_smollm2.json and says so
    import json

    from calm.cli.generate import SUMMARY_TOKENS
    from calm.cli.main import cli

    report = json.loads((Path(__file__).parents[1] / "benchmarks/results/summary_length_smollm2.json").read_text())
    first = [r["first_sentence_tokens"] for r in report["rows"]]
    assert report["docs"] >= 40 and report["max_new_tokens"] >= 160
    held = sum(n is not None and n <= SUMMARY_TOKENS for n in first)
    assert held >= 0.95 * len(first) and sum(n is not None and n <= SUMMARY_TOKENS - 8 for n in first) < held
    option = next(p for p in cli.commands["summarize"].params if p.name == "max_new_tokens")
    assert option.default == SUMMARY_TOKENS and "95%" in option.help and "summary_length_smollm2" in option.help
    help_text = invoke("summarize", "--help").output
    assert "first sentence of 95%" in " ".join(help_text.split())


def test_the_cut_note_says_when_an_output_went_on_past_a_complete_sentence():
    from calm.engine.generation import Timings
    from calm.eval.render import _cut_note
    from calm.eval.summarize import DocumentSummary

    def doc(text: str, reason: str) -> DocumentSummary:
        return DocumentSummary("a", text, (1,) * 4, (4,) * 4, 4, 1, Timings(0.1, 0.1, 4, 3), finish_reason=reason)

    docs = [doc("One sentence. And then more", "length"), doc("no end", "length"), doc("Done.", "stop")]
    note = _cut_note(docs, 4)
    assert note == (
        '; 2 of 3 outputs stopped at --max-new-tokens 4 (finish_reason "length", likely mid-sentence; 1 of them after '
        "a complete sentence: the model went on past it)"
    )
