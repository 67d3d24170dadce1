"""``cepo.demo``: the synthetic task is consistent."""

from __future__ import annotations

import os

from cepo.data import load_rows
from cepo.reward import extract_boxed


def test_demo_problems_are_consistent(tmp_path):
    from cepo import demo

    paths = demo.make_data(str(tmp_path), seed=0, n_sft=20, n_rl=20, n_eval=20)
    for name in ("sft", "train", "eval"):
        rows = load_rows(paths[name], "question", "answer")
        assert len(rows) == 20
    import json

    for line in open(paths["sft"]):
        row = json.loads(line)
        expr = row["question"][len("Compute ") : -1]
        assert str(eval(expr)) == row["answer"]  # + and - only, left to right == Python's order
        assert extract_boxed(row["solution"]) == row["answer"]
        assert row["sft_solution"] in (row["solution"], row["flawed_solution"])
        assert extract_boxed(row["flawed_solution"]) == row["solution"].split("\n")[0].split("=")[1]
    assert os.path.getsize(paths["eval"]) > 0
