"""Shared fixtures for the trainer tests: a tiny tokenizer, model and data set built locally."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from omegaconf import OmegaConf

from cepo import demo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """``{"model", "train", "eval"}`` paths: a random-init 2-layer Qwen3 and 64 + 16 arithmetic problems."""
    out = str(tmp_path_factory.mktemp("assets"))
    sizes = dict(n_sft=8, n_rl=64, n_eval=16)
    return demo.build_assets(out, sft_steps=0, seed=1, data_sizes=sizes, model_shape=TINY, model_dir="model")


def make_config(assets: dict, out: str, **kw) -> list[str]:
    """A fast config as a YAML file (its path and no overrides): 2 prompts x 4 rollouts of at most
    12 tokens, fp32, ZeRO 0, one step. ``a__b=v`` sets ``a.b``."""
    values = {
        "model.path": assets["model"],
        "data.train_file": assets["train"],
        "data.instruction": "Answer in \\boxed{}.",
        "output_dir": out,
        "rollout.prompts_per_step": 2,
        "rollout.group_size": 4,
        "rollout.max_new_tokens": 12,
        "optim.micro_batch_size": 8,
        "optim.lr": 1e-2,
        "scoring.kernel_backend": "torch",
        "steps": 1,
        "save_every": 0,
        "progress_bar": False,
        "algorithm.teacher_template": "\nAnswer: {answer}\n",
        # a random model never gets the arithmetic right: a reward that varies within groups
        "reward.functions": ["tests.trainer.rewards:digit_count"],
        "reward.math_verify": False,
    }
    values.update({k.replace("__", "."): v for k, v in kw.items()})
    tree: dict = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "test_config.yaml")
    OmegaConf.save(OmegaConf.create(tree), path)
    return path


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.named_parameters()}


def write_jsonl(path: str, rows: list) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def subprocess_env() -> dict:
    """The environment of a child ``cepo`` process: this checkout importable, one thread, and no
    rendezvous variables inherited from the test process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def kill_at_checkpoint(cmd: list[str], run_dir: str, step: int, timeout: float) -> None:
    """Run ``cmd`` and ``kill -9`` it as soon as ``run_dir``'s latest checkpoint is ``step``;
    fails if it finished first."""
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), **quiet)
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(pointer) and open(pointer).read().strip() == f"step-{step:06d}":
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.fixture
def float64(monkeypatch):
    """Trainers built in the test load their policy in float64 (RMSNorm kept in float64 too); one
    rank's gradient all-reduce, the identity that DeepSpeed refuses for float64, is skipped."""
    import deepspeed.runtime.engine as ds_engine

    from cepo import train as train_mod
    from tests.trainer.test_packing import _exact_float64

    real = train_mod.load_policy

    def load(cfg, **kw):
        return _exact_float64(real(cfg, **kw).double())

    monkeypatch.setattr(train_mod, "load_policy", load)
    monkeypatch.setattr(ds_engine.DeepSpeedEngine, "allreduce_gradients", lambda self, *a, **k: None)
