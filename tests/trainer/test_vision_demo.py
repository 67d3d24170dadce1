"""The vision-language demo: ``python -m cepo.demo --task vision --skip-train`` writes a loadable model
directory and EasyR1 data; a 3-step CEPO run on those assets, killed (-9) after step 2 and resumed,
ends with the parameters of the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from cepo import checkpoint as ckpt
from cepo import demo_vision as dv
from tests.trainer.conftest import ROOT, kill_at_checkpoint
from tests.trainer.conftest import subprocess_env as _env


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("vldemo"))
    cmd = [sys.executable, "-m", "cepo.demo", "--task", "vision", "--out", out, "--skip-train", "--sft-steps", "0"]
    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, timeout=300, capture_output=True)
    return out


def test_skip_train_writes_model_and_easyr1_data(demo_assets):
    model_dir = os.path.join(demo_assets, "base_model")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert os.path.isfile(os.path.join(model_dir, name)), name
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["model_type"] == "qwen3_vl"
    for split in ("train", "eval"):
        table = pq.read_table(os.path.join(demo_assets, f"{split}.parquet"))
        assert table.column_names == ["images", "problem", "answer"]
        row = table.slice(0, 1).to_pylist()[0]
        assert row["problem"].count("<image>") == len(row["images"]) == 1
        assert row["images"][0]["bytes"][:4] == b"\x89PNG"


def _final_params(run_dir: str) -> dict:
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def test_vl_demo_kill_and_resume_equals_uninterrupted(demo_assets, tmp_path):
    """3 CEPO steps on the demo assets; kill -9 at the step-2 checkpoint and --resume gives the same model."""
    config = os.path.join(ROOT, "configs", "demo_vision.yaml")
    over = [
        f"model.path={os.path.join(demo_assets, 'base_model')}",
        f"data.train_file={os.path.join(demo_assets, 'train.parquet')}",
        "steps=3", "save_every=2", "eval_every=0", "rollout.prompts_per_step=4", "rollout.group_size=4",
        "rollout.max_new_tokens=12", "optim.micro_batch_size=8", "algorithm.lam_decay_steps=2", "progress_bar=false",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "cepo.cli", "train", config]
    straight = str(tmp_path / "straight")
    subprocess.run(cmd + over + [f"output_dir={straight}"], cwd=ROOT, env=_env(), check=True, timeout=600)
    killed = str(tmp_path / "killed")
    kill_at_checkpoint(cmd + over + [f"output_dir={killed}"], killed, 2, timeout=600)
    assert ckpt.latest(os.path.join(killed, "checkpoints")).endswith("step-000002")
    subprocess.run(cmd + over + [f"output_dir={killed}", "--resume"], cwd=ROOT, env=_env(), check=True, timeout=600)
    a, b = _final_params(straight), _final_params(killed)
    assert any(k.startswith("model.visual.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    records = [json.loads(line) for line in open(os.path.join(killed, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3]
    patches = (64 // dv.GRID.patch_size) ** 2
    assert all(r["tokens/vision"] == 4 * patches for r in records)  # 4 prompts, each image once per step
    assert os.path.isfile(os.path.join(straight, "final", "preprocessor_config.json"))
