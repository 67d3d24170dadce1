"""Every ``cepo`` command speaks to a person: a user error is one line on stderr and exit status 2;
``--debug`` shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cepo import cli
from tests.trainer.conftest import make_config, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one_line_error(capsys, argv, command: str) -> str:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"cepo {command}: error: "), err
    return err[0]


def test_train_without_arguments_names_the_config_not_overrides(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "required: config" in err[0] and "overrides" not in err[0]


def test_help_points_at_existing_docs():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = "".join(p.format_help() for p in sub.choices.values())
    assert "docs/trainer.md" not in text and "README.md" in text
    assert set(sub.choices) == {"train", "eval", "export", "compare", "viz"}


def test_missing_model_directory_is_named_before_the_tokenizer_loads(assets, tmp_path, capsys):
    config = make_config(assets, str(tmp_path / "run"))
    line = one_line_error(capsys, ["train", config, "model.path=/no/such/model"], "train")
    assert "model.path" in line and "/no/such/model" in line and "Repo id" not in line
    line = one_line_error(capsys, ["eval", "/no/such/model", assets["eval"]], "eval")
    assert "model directory not found: /no/such/model" in line
    line = one_line_error(capsys, ["eval", assets["model"], str(tmp_path / "none.jsonl")], "eval")
    assert "data file not found" in line
    not_a_model = tmp_path / "empty_dir"
    not_a_model.mkdir()
    line = one_line_error(capsys, ["train", config, f"model.path={not_a_model}"], "train")
    assert "not a Hugging Face model directory" in line
    with pytest.raises(FileNotFoundError):  # --debug: the exception itself, with its traceback
        cli.main(["train", config, "model.path=/no/such/model", "--debug"])
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "eval", "/no/such/model", assets["eval"]])


def test_trainer_checks_the_model_path_itself(assets, tmp_path):
    from cepo.config import load_config
    from cepo.train import Trainer

    cfg = load_config(make_config(assets, str(tmp_path / "run"), model__path="/no/such/model"))
    with pytest.raises(FileNotFoundError, match="model.path: model directory not found"):
        Trainer(cfg)


def test_config_errors_are_one_line(assets, tmp_path, capsys):
    config = make_config(assets, str(tmp_path / "run"))
    assert "unknown config key 'no'" in one_line_error(capsys, ["train", config, "no.such=1"], "train")
    assert "algorithm.name" in one_line_error(capsys, ["train", config, "algorithm.name=ppo"], "train")
    assert "config file not found" in one_line_error(capsys, ["train", str(tmp_path / "x.yaml")], "train")
    assert "expected dotted.key=value" in one_line_error(capsys, ["train", config, "steps"], "train")
    assert "data.train_file" in one_line_error(capsys, ["train", config, "data.train_file=/nope.jsonl"], "train")
    assert "no Hugging Face model" in one_line_error(capsys, ["export", str(tmp_path), str(tmp_path / "o")], "export")


def _cepo(*args: str) -> subprocess.CompletedProcess:
    dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # set by in-process Trainers
    env = {**{k: v for k, v in os.environ.items() if k not in dist_vars}, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "cepo.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def test_bad_data_row_and_unknown_reward_function_in_a_real_process(assets, tmp_path):
    """Errors raised inside the trainer (after torch.distributed is up): no ``[rank0]:`` traceback."""
    bad = write_jsonl(str(tmp_path / "bad.jsonl"), ['{"question": "1+1", "answer": "2"}', '{"question": "2+2"'])
    config = make_config(assets, str(tmp_path / "run"))
    p = _cepo("train", config, f"data.train_file={bad}")
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert err == [f"cepo train: error: {bad}: row 2: not valid JSON (Expecting ',' delimiter)"], p.stderr
    p = _cepo("train", config, "reward.functions=[no_such_module:score]")
    assert p.returncode == 2, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "reward function 'no_such_module:score'" in line and "Traceback" not in p.stderr
    p = _cepo("train", config, f"data.train_file={bad}", "--debug")
    assert p.returncode == 1 and "Traceback" in p.stderr and "row 2" in p.stderr
