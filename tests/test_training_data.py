"""calm.training.data: reading the files, and the sequences that train."""

from __future__ import annotations

from pathlib import Path

import pytest

from calm.checkpoints.checkpoint import read_config
from calm.errors import InputError
from calm.model import CalmModel
from calm.training import TrainConfig, read_training_data, summary_sequence, text_chunks, train
from calm.training.data import lora_sequences
from training_helpers import training_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.jsonl", b"", "holds no records"),
        ("blank.jsonl", b'{"document": "  "}\n', "no records with a non-empty document"),
        ("number.jsonl", b'{"document": 3}\n', "not text"),
        ("list.jsonl", b"[1, 2]\n", "expected a JSON object"),
        ("nofield.jsonl", b'{"text": "a story"}\n', "no field 'document'"),
        ("latin1.jsonl", '{"document": "caf\u00e9"}\n'.encode("latin-1"), "not UTF-8"),
        ("notjson.jsonl", b"{document: 1}\n", "not valid JSON"),
        ("empty.txt", b"  \n", "is empty"),
        ("latin1.txt", "caf\u00e9 au lait".encode("latin-1"), "not UTF-8"),
        ("data.csv", b"a,b\n", "unsupported training data file"),
    ],
)
def test_bad_data_is_a_clear_input_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    # the data is read before any model is loaded: the model need not even exist
    with pytest.raises(InputError, match=message):
        train(
            TrainConfig(data=(str(path),), out=str(tmp_path / "out"), model=str(tmp_path / "no-model")), progress=False
        )


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="not found"):
        train(TrainConfig(data=(str(tmp_path / "nope.jsonl"),), out=str(tmp_path / "o")), progress=False)
    with pytest.raises(InputError, match="is a directory"):
        read_training_data([str(tmp_path)])


def test_empty_documents_are_skipped_and_recorded(training_setup, tmp_path):
    docs = tmp_path / "docs.jsonl"
    lines = Path(training_setup["docs"]).read_text().splitlines()
    docs.write_text("\n".join(lines[:2] + ['{"id": "g", "document": "", "summary": "a gallery"}'] + lines[2:4]) + "\n")
    data = read_training_data([str(docs)])
    assert len(data.documents) == 4 and data.files[0]["skipped_empty_documents_at_lines"] == [3]
    train(training_config(training_setup, tmp_path / "o", data=(str(docs),), steps=1), progress=False)
    assert read_config(tmp_path / "o").extra["training"]["data"][0]["skipped_empty_documents_at_lines"] == [3]


def test_summary_sequence_positions_predict_the_summary():
    seq = summary_sequence([5, 6, 7], [8, 9], "summary", "f")
    assert seq.ids == (5, 6, 7, 8, 9) and seq.positions == (2, 3) and seq.targets == (8, 9)
    assert all(seq.ids[p + 1] == t for p, t in zip(seq.positions, seq.targets))


def test_text_chunks_are_seeded_and_predict_the_next_token(training_setup):
    tokenizer = CalmModel.from_pretrained(training_setup["backbone"]).tokenizer
    texts = read_training_data([training_setup["text"]]).texts
    config = training_config(training_setup, "o", chunk_tokens=32, max_chunks=3, positions_per_chunk=5)
    chunks = text_chunks(tokenizer, texts, config)
    assert len(chunks) == 3 and all(len(c.ids) <= 32 and len(c.positions) == 5 for c in chunks)
    for c in chunks:
        assert list(c.positions) == sorted(c.positions) and min(c.positions) >= 8  # after some context
        assert all(c.ids[p + 1] == t for p, t in zip(c.positions, c.targets))
    assert text_chunks(tokenizer, texts, config) == chunks  # a function of the seed
    assert text_chunks(tokenizer, texts, TrainConfig(**{**config.to_dict(), "seed": 4})) != chunks


def test_lora_sequences_train_on_the_summary_and_document_positions(training_setup):
    calm = CalmModel.from_pretrained(training_setup["backbone"])
    config = training_config(training_setup, "o", mode="lora", doc_positions=3, max_chunks=2)
    data = read_training_data(config.data)
    sequences = lora_sequences(calm, data, config)
    assert [s.kind for s in sequences] == ["reference"] * 6 + ["text"] * 2
    first = sequences[0]
    summary = calm.tokenizer(data.documents[0][1].summary, add_special_tokens=False)["input_ids"]
    assert list(first.ids[-len(summary) - 1 :]) == summary + [calm.eos_token_ids[0]]
    summary_positions = tuple(range(len(first.ids) - len(summary) - 2, len(first.ids) - 1))
    assert first.positions[3:] == summary_positions and max(first.positions[:3]) < summary_positions[0]
    assert all(first.ids[p + 1] == t for p, t in zip(first.positions, first.targets))
