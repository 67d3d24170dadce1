"""Checks that turn a user's mistake into one clear message before a library turns it into a
traceback (transformers, given a directory that does not exist, reports it as a bad hub repo id).

The ``cepo`` command prints these errors as one line and exits with status 2 (see :mod:`cepo.cli`).
"""

from __future__ import annotations

import os


def check_model_dir(path: str, what: str = "model.path") -> None:
    """``path`` must be a local Hugging Face model (or adapter) directory."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: model directory not found: {path}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{what}: not a directory: {path}")
    if not any(os.path.isfile(os.path.join(path, n)) for n in ("config.json", "adapter_config.json")):
        raise FileNotFoundError(f"{what}: {path} is not a Hugging Face model directory (no config.json)")


def check_tokenizer_dir(path: str, what: str = "model.tokenizer") -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: tokenizer directory not found: {path}")


def check_data_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: data file not found: {path}")


def check_train_paths(cfg) -> None:
    """Every path a :class:`cepo.config.TrainConfig` names, before anything is loaded from it."""
    check_model_dir(cfg.model.path, "model.path")
    if cfg.model.tokenizer:
        check_tokenizer_dir(cfg.model.tokenizer)
    check_data_file(cfg.data.train_file, "data.train_file")
    if cfg.data.eval_file is not None:
        check_data_file(cfg.data.eval_file, "data.eval_file")
