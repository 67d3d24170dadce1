"""``cepo.config``: unknown, missing and bad values are errors that name them."""

from __future__ import annotations

import pytest

from cepo.config import load_config


def test_config_unknown_key_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: m\ndata:\n  train_file: t.jsonl\nrollout:\n  group_sise: 4\n")
    with pytest.raises(ValueError, match="rollout.group_sise"):
        load_config(str(path))
    with pytest.raises(ValueError, match="optim.lrr"):
        load_config(None, ["model.path=m", "data.train_file=t", "optim.lrr=1"])


def test_config_missing_file_and_missing_values_and_bad_values(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="model.path"):
        load_config(None, ["data.train_file=t"])
    with pytest.raises(ValueError, match="algorithm.name"):
        load_config(None, ["model.path=m", "data.train_file=t", "algorithm.name=ppo"])
    with pytest.raises(ValueError, match="rollout.group_size"):
        load_config(None, ["model.path=m", "data.train_file=t", "rollout.group_size=four"])
    with pytest.raises(ValueError, match="algorithm.eps_w"):
        load_config(None, ["model.path=m", "data.train_file=t", "algorithm.eps_w=1.5"])
    cfg = load_config(None, ["model.path=m", "data.train_file=t", "optim.clip_high=0.3", "optim.dual_clip=3"])
    assert cfg.optim.clip_high == 0.3 and cfg.optim.dual_clip == 3.0 and cfg.optim.clip_low == 0.2
