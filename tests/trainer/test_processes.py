"""Multi-process behaviour: data parallel, kill + resume, and a checkpoint write that dies midway."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cepo import checkpoint as ckpt
from cepo.config import load_config
from cepo.train import Trainer
from tests.trainer.conftest import ROOT, kill_at_checkpoint, make_config
from tests.trainer.conftest import subprocess_env as _env


@pytest.mark.slow
def test_two_process_data_parallel_equals_one_process(assets, tmp_path):
    """2 packed ranks (gloo) == 1 packed process == 1 padded process, on the same global batch."""
    kw = dict(rollout__prompts_per_step=4, optim__micro_batch_size=4, algorithm__name="cepo", algorithm__lam=1.0)
    cfg = make_config(assets, str(tmp_path / "run"), **kw)
    padded_cfg = make_config(assets, str(tmp_path / "padded"), scoring__packing="false", **kw)
    one, two, padded = str(tmp_path / "one.pt"), str(tmp_path / "two.pt"), str(tmp_path / "padded.pt")
    for config, out in ((cfg, one), (padded_cfg, padded)):  # packed (the default here) and padded, 1 process
        worker = [sys.executable, "-m", "tests.trainer.dp_worker", config, out]
        subprocess.run(worker, cwd=ROOT, env=_env(), check=True, timeout=300)
    from cepo.engine import _free_port

    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "tests.trainer.dp_worker",
            cfg,
            two,
        ],
        cwd=ROOT,
        env=_env(),
        check=True,
        timeout=300,
    )
    a, b, c = torch.load(one), torch.load(two), torch.load(padded)
    assert a["world"] == 1 and b["world"] == 2 and a["packed"] and b["packed"] and not c["packed"]
    for k, v in a["params"].items():
        torch.testing.assert_close(v, b["params"][k], rtol=0, atol=1e-5, msg=k)  # 2 packed ranks == 1
        torch.testing.assert_close(c["params"][k], b["params"][k], rtol=0, atol=1e-5, msg=k)  # == padded
    init = load_file(os.path.join(assets["model"], "model.safetensors"))
    moved = sum(not torch.equal(init[k], v) for k, v in a["params"].items() if k in init)
    assert moved > 0


def _final_params(run_dir: str) -> dict:
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def test_kill_and_resume_equals_uninterrupted(assets, tmp_path):
    """2 steps + kill -9 + --resume + 2 steps gives the parameters of 4 uninterrupted steps."""
    kw = dict(steps=4, save_every=2, algorithm__name="cepo", algorithm__lam_decay_steps=3, optim__warmup_steps=1)
    straight = str(tmp_path / "straight")
    cmd = [sys.executable, "-m", "cepo.cli", "train"]
    subprocess.run(cmd + [make_config(assets, straight, **kw)], cwd=ROOT, env=_env(), check=True, timeout=300)

    killed = str(tmp_path / "killed")
    config = make_config(assets, killed, **kw)
    kill_at_checkpoint(cmd + [config], killed, 2, timeout=300)
    assert ckpt.latest(os.path.join(killed, "checkpoints")).endswith("step-000002")
    assert not os.path.exists(os.path.join(killed, "final"))

    subprocess.run(cmd + [config, "--resume"], cwd=ROOT, env=_env(), check=True, timeout=300)
    a, b = _final_params(straight), _final_params(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in open(os.path.join(killed, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]


def test_checkpoint_write_dying_midway_leaves_previous_loadable(assets, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    trainer = Trainer(load_config(make_config(assets, out, steps=3)))
    trainer.step(1)
    trainer.step_done = 1
    trainer.save(1)
    saved = {k: v.detach().clone() for k, v in trainer.engine.module.named_parameters()}
    trainer.step(2)

    def dies(*a, **k):  # the DeepSpeed state is written, then the process "dies" writing the HF copy
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt, "save_hf", dies)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(2)
    root = os.path.join(out, "checkpoints")
    assert os.path.isdir(os.path.join(root, ".tmp-step-000002", "ds"))  # the half-written one
    assert ckpt.latest(root).endswith("step-000001")
    monkeypatch.undo()

    resumed = Trainer(load_config(make_config(assets, out, steps=3)), resume=True)
    assert resumed.step_done == 1
    assert resumed.stream.state() == {**trainer.stream.state(), "index": 2}
    for k, v in resumed.engine.module.named_parameters():
        assert torch.equal(v.detach(), saved[k]), k
    resumed.save(2)  # a later save clears the debris
    assert not os.path.exists(os.path.join(root, ".tmp-step-000002"))
    assert ckpt.latest(root).endswith("step-000002")


def test_raising_reward_function_is_counted_in_training_metrics(assets, tmp_path):
    out = str(tmp_path / "run")
    cfg = load_config(
        make_config(
            assets,
            out,
            steps=1,
            reward__functions=["tests.trainer.rewards:digit_count", "tests.trainer.rewards:raises_on_odd"],
        )
    )
    summary = Trainer(cfg).fit()
    import json

    record = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    assert summary["reward_errors"] == record["reward_errors"] > 0
    assert os.path.isfile(os.path.join(out, "final", "model.safetensors"))


def test_lora_zero2_train_export_merged_and_eval(assets, tmp_path):
    """LoRA under ZeRO-2 trains only the adapters; export merges them; ``cepo eval`` reads the result."""
    from cepo.cli import main as cli

    out = str(tmp_path / "lora")
    trainer = Trainer(
        load_config(
            make_config(
                assets, out, steps=1, engine__zero_stage=2, model__lora=True, model__lora_r=4, model__lora_alpha=8
            )
        )
    )
    frozen = {k: v.detach().clone() for k, v in trainer.engine.module.named_parameters() if not v.requires_grad}
    trainer.fit()
    assert frozen and all(
        torch.equal(v.detach(), frozen[k]) for k, v in trainer.engine.module.named_parameters() if k in frozen
    )
    assert os.path.isfile(os.path.join(out, "final", "adapter_config.json"))
    merged = str(tmp_path / "merged")
    assert cli(["export", out, merged, "--merge-lora"]) == 0
    assert os.path.isfile(os.path.join(merged, "model.safetensors"))
    assert not os.path.isfile(os.path.join(merged, "adapter_config.json"))
    assert cli(["eval", merged, assets["eval"], "rollout.max_new_tokens=8"]) == 0
