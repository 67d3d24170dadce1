"""Every launcher the README names, with real processes on 127.0.0.1 (gloo).

- ``cepo train`` alone, the ``deepspeed`` launcher (``--local_rank=N``) and two ``torchrun`` agents
  with ``--nnodes 2 --node_rank 0|1`` (two "nodes" on one host, one ``output_dir`` as the shared
  filesystem; killed and resumed) train 3 steps to the same weights; ``srun``'s ``SLURM_*``
  variables become the rendezvous.
- A wrong world size or an unreachable master ends within ``engine.dist_timeout_s`` with one line
  that names the rendezvous; a node killed with ``kill -9`` mid-step ends the other node's run
  (no hang), and ``--resume`` then finishes with the weights of the uninterrupted run.

The workers are ``tests.trainer.launch_worker``: the real ``cepo`` command line with rollouts that
depend only on the prompt, so every world size sees the same global batch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file

from cepo import checkpoint as ckpt
from cepo import cli
from cepo.engine import _free_port, launcher_env
from tests.trainer.conftest import ROOT, make_config, subprocess_env

WORKER = [sys.executable, "-m", "tests.trainer.launch_worker"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
# 4 prompts x 4 rollouts, 2 micro-batches per rank and step: the same global batch on 1 or 2 ranks
RUN = dict(
    rollout__prompts_per_step=4,
    optim__micro_batch_size=4,
    algorithm__name="cepo",
    algorithm__lam_decay_steps=2,
    optim__warmup_steps=1,
    steps=3,
    save_every=2,
    engine__dist_timeout_s=60,
)


def _final(run_dir: str) -> dict:
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def _assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:  # data parallel == one process: the same sums in another order (fp32 rounding)
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=f"{what}: {k}")


def _output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read().decode(errors="replace")[-3000:]


def _wait(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.time() + timeout
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.time()))


def _check(procs: list[subprocess.Popen], what: str, timeout: float = 400) -> None:
    _wait(procs, timeout)
    for p in procs:
        assert p.returncode == 0, f"{what} failed ({p.returncode}):\n{_output(p)}"


def _start(cmd: list[str], **env) -> subprocess.Popen:
    """``cmd`` in the background, its output in a temporary file (``proc.log``): no pipe to fill."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**subprocess_env(), **env}, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def _two_nodes(port: int, args: list[str]) -> list[subprocess.Popen]:
    """Two ``torchrun`` agents, one per "node", one worker each, meeting at 127.0.0.1:port."""
    node = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [
        _start(TORCHRUN + node + ["--node_rank", str(i), "-m", "tests.trainer.launch_worker"] + args) for i in (0, 1)
    ]


def test_local_rank_argument_of_the_deepspeed_launcher(monkeypatch):
    """``--local_rank=N`` / ``--local_rank N`` before or after the subcommand; ``LOCAL_RANK`` wins."""
    parser = cli.build_parser()
    for argv in (["--local_rank=1", "train", "c.yaml"], ["train", "--local_rank", "1", "c.yaml", "a.b=1"]):
        args = parser.parse_args(argv)
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        cli._local_rank(args)
        assert os.environ["LOCAL_RANK"] == "1" and args.config == "c.yaml"
    monkeypatch.setenv("LOCAL_RANK", "0")
    cli._local_rank(parser.parse_args(["--local-rank=1", "train", "c.yaml"]))
    assert os.environ["LOCAL_RANK"] == "0"


@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory) -> dict:
    """``cepo train`` alone: 3 steps, checkpoints at 2 and 3; the final weights every launcher must reach."""
    out = str(tmp_path_factory.mktemp("one"))
    _check([_start(WORKER + ["train", make_config(assets, out, **RUN)])], "one process")
    return _final(out)


def test_srun_variables_become_the_rendezvous(monkeypatch):
    """What ``srun`` sets for task 3 of 8 (4 per node): rank 3, world 8, local rank 1."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT not set"):
        launcher_env()
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launcher_env() == "srun"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "8", "1")


@pytest.mark.slow
def test_deepspeed_launcher_trains_to_the_weights_of_one_process(assets, tmp_path, one_process):
    """``deepspeed --num_gpus 2 --module ...`` (``--local_rank=N``, 2 ranks) == ``cepo train`` alone."""
    out = str(tmp_path / "deepspeed")
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(_free_port()), "--module"]
    _check([_start(cmd + ["tests.trainer.launch_worker", "train", make_config(assets, out, **RUN)])], "deepspeed")
    _assert_same_weights(one_process, _final(out), "deepspeed launcher")
    init = load_file(os.path.join(assets["model"], "model.safetensors"))
    assert any(not torch.equal(init[k], v) for k, v in one_process.items() if k in init)


def _one_line_failure(cmd: list[str], limit: float, **env) -> tuple[str, float]:
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**subprocess_env(), **env}, capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("cepo train: error: ") and "engine.dist_timeout_s" in line, line
    assert took < limit, f"took {took:.0f} s"
    return line, took


@pytest.mark.slow
def test_wrong_world_size_and_unreachable_master_fail_clearly_in_bounded_time(assets, tmp_path):
    """Rank 0 of a world of 2 that nobody joins, and rank 1 whose master does not answer: one line
    each, within the 5 s timeout plus start-up."""
    cfg = make_config(assets, str(tmp_path / "run"), engine__dist_timeout_s=5)
    cmd = [sys.executable, "-m", "cepo.cli", "train", cfg]
    rendezvous = dict(WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    line, _ = _one_line_failure(cmd, 120, RANK="0", **rendezvous)
    assert "WORLD_SIZE=2" in line and "not all joined" in line
    line, _ = _one_line_failure(cmd, 120, RANK="1", **rendezvous)  # nobody listens on that port
    assert f"127.0.0.1:{rendezvous['MASTER_PORT']}" in line and "MASTER_ADDR" in line


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


@pytest.mark.slow
def test_killed_node_ends_the_run_and_resume_equals_uninterrupted(assets, tmp_path, one_process):
    """Two ``torchrun`` agents (``--nnodes 2 --node_rank 0|1``, one ``output_dir`` as the shared
    filesystem), 3 steps: ``kill -9`` node 1's worker during step 3; node 0 stops with an error (no
    hang); ``--resume`` on both nodes finishes with the weights of one uninterrupted process."""
    killed = str(tmp_path / "killed")
    cfg = make_config(assets, killed, **RUN)
    nodes = _two_nodes(_free_port(), ["train", cfg])
    pointer = os.path.join(killed, "checkpoints", "latest")
    deadline = time.time() + 400
    while time.time() < deadline and nodes[1].poll() is None:
        if os.path.isfile(pointer) and open(pointer).read().strip() == "step-000002":
            os.kill(_children(nodes[1].pid)[0], signal.SIGKILL)  # node 1's worker: rank 1
            break
        time.sleep(0.01)
    t_kill = time.time()
    _wait(nodes, 200)  # gloo sees the closed connection at once; the 60 s timeout bounds it otherwise
    assert all(p.returncode != 0 for p in nodes), _output(nodes[0])
    assert time.time() - t_kill < 200
    assert ckpt.latest(os.path.join(killed, "checkpoints")).endswith("step-000002")
    assert not os.path.exists(os.path.join(killed, "final"))

    _check(_two_nodes(_free_port(), ["train", cfg, "--resume"]), "resume on 2 nodes")
    _assert_same_weights(one_process, _final(killed), "2 nodes, killed + resumed")
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in open(os.path.join(killed, "metrics.jsonl"))]
    assert steps == [1, 2, 3]
