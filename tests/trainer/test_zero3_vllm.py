"""ZeRO-3 with vLLM rollouts on 2 ranks (gloo, CPU): each rank's colocated engine receives the
policy gathered one module at a time, and samples what the trainer then scores.

Runs in the vLLM environment (``.venv-vllm``); skipped where vLLM cannot be imported, like
``tests/trainer/test_vllm.py``, whose demo assets and run config it shares.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from cepo.engine import _free_port
from tests.trainer.conftest import ROOT
from tests.trainer.conftest import subprocess_env as _env
from tests.trainer.test_vllm import _metrics, _run_config, demo_assets, needs_vllm  # noqa: F401 (a fixture)


@needs_vllm
@pytest.mark.slow
def test_zero3_packed_two_ranks_with_vllm_follow_the_policy(demo_assets, tmp_path):  # noqa: F811
    """2 ranks, ZeRO-3, packed passes: the update of step 1 moves the weights (a reward that varies
    within groups), and the engines sample step 2 with them (``rollout/logprob_diff`` < 1e-3)."""
    run = str(tmp_path / "z3")
    config = _run_config(
        demo_assets,
        run,
        engine__zero_stage=3,
        scoring__packing="true",
        engine__dist_timeout_s=300,
        rollout__prompts_per_step=8,
        optim__micro_batch_size=32,
        steps=2,
        save_every=0,
        reward__math_verify=False,  # a reward that varies within groups: nonzero advantages, a real update
        reward__functions=["tests.trainer.rewards:digit_count"],
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += ["-m", "tests.trainer.vllm_worker", config, str(tmp_path / "z3.jsonl")]
    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, timeout=900)
    rows = [m for m in _metrics(run) if "reward" in m]
    assert [m["step"] for m in rows] == [1, 2]
    for m in rows:
        assert m["rollout/logprob_diff"] < 1e-3 and m["loss"] == m["loss"], m
    assert rows[0]["grad_norm"] > 0, rows[0]  # step 1 changed the weights that step 2's engines sampled with
