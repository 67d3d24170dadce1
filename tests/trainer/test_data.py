"""``cepo.data``: loading rows (errors name the file and row) and the resumable prompt stream."""

from __future__ import annotations

import pytest

from cepo.data import PromptStream, load_rows
from tests.trainer.conftest import write_jsonl


def test_bad_data_rows_name_file_and_row(tmp_path):
    good = {"question": "q", "answer": "1"}
    bad_json = write_jsonl(str(tmp_path / "a.jsonl"), [good, good, '{"question": "q", "answer": '])
    with pytest.raises(ValueError, match=r"a\.jsonl: row 3: not valid JSON"):
        load_rows(bad_json, "question", "answer")
    empty = write_jsonl(str(tmp_path / "b.jsonl"), [good, {"question": "q", "answer": ""}])
    with pytest.raises(ValueError, match=r"b\.jsonl: row 2: empty or missing 'answer'"):
        load_rows(empty, "question", "answer")
    missing = write_jsonl(str(tmp_path / "c.jsonl"), [{"problem": "q", "answer": "1"}])
    with pytest.raises(ValueError, match=r"c\.jsonl: row 1: no field 'question'"):
        load_rows(missing, "question", "answer")
    assert load_rows(missing, "problem", "answer") == [("q", "1")]
    with pytest.raises(FileNotFoundError, match="d.jsonl"):
        load_rows(str(tmp_path / "d.jsonl"), "question", "answer")


def test_csv_and_parquet_load(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"question": ["1+1", "2+2"], "answer": [2, 4]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        assert load_rows(str(tmp_path / name), "question", "answer") == [("1+1", "2"), ("2+2", "4")]


def test_prompt_stream_is_deterministic_and_resumable():
    a = PromptStream(10, seed=3)
    first = a.next(7)
    state = a.state()
    rest = a.next(9)  # crosses into the next epoch
    b = PromptStream(10, seed=3)
    b.load_state(state)
    assert b.next(9) == rest
    assert sorted(first + rest[:3]) == list(range(10))
    assert PromptStream(10, seed=4).next(10) != PromptStream(10, seed=3).next(10)
