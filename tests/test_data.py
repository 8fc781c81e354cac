import json

import pytest

from calm.errors import InputError
from calm.prompts.documents import parse_jsonl, read_jsonl, read_text, summary_prompt


def write(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_reads_records_with_optional_summary(tmp_path):
    rows = [{"id": "a", "document": "One.", "summary": "1"}, {"document": "Two."}]
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows).encode() + b"\n\n")
    records = read_jsonl(path)
    assert [(r.id, r.document, r.summary) for r in records] == [("a", "One.", "1"), ("2", "Two.", None)]
    assert len(read_jsonl(path, limit=1)) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "no records"),
        (b"{bad json\n", "not valid JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"text": "x"}\n', "no field 'document'"),
        (b'{"document": "  "}\n', "empty"),
        (b'{"document": "caf\xe9"}\n', "not UTF-8"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, content, message):
    with pytest.raises(InputError, match=message):
        read_jsonl(write(tmp_path, "bad.jsonl", content))


def test_required_summary_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="reference summary"):
        parse_jsonl('{"document": "x"}', "<stdin>", require_summary=True)
    with pytest.raises(InputError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="empty"):
        read_text(write(tmp_path, "e.txt", b"  \n"))


def test_summary_prompt_wraps_the_document():
    assert summary_prompt("  An article.  ").endswith("\n\nAn article.")


def test_truncate_document_keeps_the_first_tokens(tiny_model):
    from transformers import AutoTokenizer

    from calm.prompts.documents import truncate_document

    tok = AutoTokenizer.from_pretrained(tiny_model)
    doc = "the cat sat on the mat . a dog ran in the park"
    assert truncate_document(tok, doc, 4) == "the cat sat on"
    assert truncate_document(tok, doc, 100) == doc
    assert truncate_document(tok, " " + doc + " ", None) == doc


def test_several_reference_summaries_in_one_field():
    lines = [
        {"id": "x", "document": "d1", "summary": ["first ref", "", "second ref"]},
        {"id": "y", "document": "d2", "summary": "only ref"},
        {"id": "z", "document": "d3"},
    ]
    records = parse_jsonl("\n".join(json.dumps(line) for line in lines), "mem")
    assert records[0].summary == "first ref" and records[0].all_references == ("first ref", "second ref")
    assert records[1].all_references == ("only ref",) and records[2].all_references == ()
