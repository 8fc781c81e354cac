"""calm.training.summaries: the summary jobs and their cache."""

from __future__ import annotations

import pytest

from calm.errors import InputError
from calm.model import CalmModel
from calm.prompts.documents import Record
from calm.training.summaries import read_summary_cache, summary_jobs, write_summary_cache
from training_helpers import training_config


def test_the_cache_round_trips_and_a_corrupt_one_is_a_clear_error(tmp_path):
    path = tmp_path / "summaries.jsonl"
    assert read_summary_cache(path) == {}
    rows = [{"key": "a", "text": "cat sat", "token_ids": [5, 6]}, {"key": "b", "text": "", "token_ids": []}]
    write_summary_cache(path, rows)
    assert read_summary_cache(path) == {"a": rows[0], "b": rows[1]}
    path.write_text('{"key": "a"}\n{not json\n')
    with pytest.raises(InputError, match="is corrupt"):
        read_summary_cache(path)


def test_jobs_are_keyed_by_prompt_sample_and_seed(training_setup, tmp_path):
    calm = CalmModel.from_pretrained(training_setup["backbone"])
    config = training_config(training_setup, tmp_path / "o")
    documents = [("f", Record(id="1", document="the cat sat on the mat")), ("f", Record(id="2", document="a dog ran"))]
    jobs = summary_jobs(calm, documents, config, samples=2)
    assert [(j.record_id, j.sample) for j in jobs] == [("1", 0), ("1", 1), ("2", 0), ("2", 1)]
    assert len({j.key for j in jobs}) == 4 and summary_jobs(calm, documents, config, samples=2) == jobs
    reseeded = summary_jobs(calm, documents, training_config(training_setup, tmp_path / "o", seed=9), samples=2)
    assert [j.key for j in reseeded][0::2] == [j.key for j in jobs][0::2]  # greedy summaries need no seed
    assert [j.key for j in reseeded][1::2] != [j.key for j in jobs][1::2]
