"""Step time of ZeRO-3 packed vs ZeRO-3 padded vs ZeRO-0 packed on the demo at 2 ranks.

``python -m bench.bench_zero3_step [--ranks 2] [--repeats 3] [--demo-dir runs/demo] [--out DIR]`` runs
``configs/demo.yaml`` (32 prompts x 8 rollouts, CEPO, the demo's warm-started 0.8M-parameter Qwen3)
under ``torchrun --nproc_per_node RANKS`` (gloo on a CPU, NCCL on GPUs) once per configuration: one
warm-up step, then ``--repeats`` timed steps. Rank 0 prints the median step and phase times and the
decoder tokens per step (experience and update, all ranks together), and appends one JSON line per
timed step to ``DIR/bench_zero3_step.jsonl`` (default ``bench/results/<machine>-zero3-step.jsonl``).

Every configuration samples the same prompts at step k (the same seed), so the token counts compare
the passes, not the data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {  # name: overrides
    "zero3-packed": ["engine.zero_stage=3", "scoring.packing=true"],
    "zero3-padded": ["engine.zero_stage=3", "scoring.packing=false"],
    "zero0-packed": ["engine.zero_stage=0", "scoring.packing=true"],
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(name: str, out: str, repeats: int, overrides: list[str]) -> None:
    """One configuration under torchrun: warm-up + ``repeats`` timed steps; rank 0 records them."""
    import torch
    import torch.distributed as dist

    from bench.common import environment
    from cepo.config import load_config
    from cepo.train import Trainer, _gather_mean

    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), overrides)
    trainer = Trainer(cfg)
    rows = []
    for k in range(1, repeats + 2):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        m = trainer.step(k)
        dist.barrier()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        m = _gather_mean(m)
        if k == 1:
            continue  # warm-up
        rows.append(
            {
                "bench": "zero3_step",
                "config": name,
                "overrides": overrides,
                "ranks": trainer.world,
                "packed": trainer.packed,
                "step": k,
                "step_s": wall,
                "step_cpu_s_rank0": cpu,
                "phases_s": {p: m[f"time/{p}"] for p in ("rollout", "experience", "update")},
                "tokens": {p: int(round(m[f"tokens/{p}"] * trainer.world)) for p in ("experience", "update")},
                "response_length": m["response_length"],
                "threads": torch.get_num_threads(),
            }
        )
    if trainer.rank == 0:
        env = environment()
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps({**env, **r}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--demo-dir", default="runs/demo", help="demo assets (built if missing)")
    p.add_argument("--out", default=None, help="directory for bench_zero3_step.jsonl")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--worker", nargs=2, metavar=("NAME", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", default=[], help="extra dotted overrides for every configuration")
    args = p.parse_args(argv)
    demo_dir = os.path.abspath(args.demo_dir)
    base = [
        f"model.path={os.path.join(demo_dir, 'base_model')}",
        f"data.train_file={os.path.join(demo_dir, 'train.jsonl')}",
        "data.eval_file=null",
        "progress_bar=false",
        "save_every=0",
        "optim.micro_batch_size=64",  # 8 groups per micro-batch: padded needs a divisor of 64 at 2 ranks
        f"output_dir={os.path.join(demo_dir, 'bench_zero3')}",
    ]
    if args.worker:
        name, out = args.worker
        worker(name, out, args.repeats, base + CONFIGS[name] + args.overrides)
        return 0
    if not os.path.isfile(os.path.join(demo_dir, "base_model", "model.safetensors")):
        from cepo import demo

        demo.build_assets(demo_dir)
    from bench.common import RESULTS_DIR, machine_name

    out_dir = args.out or str(RESULTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "bench_zero3_step.jsonl" if args.out else f"{machine_name()}-zero3-step.jsonl")
    start = sum(1 for _ in open(out)) if os.path.isfile(out) else 0
    from cepo.engine import _free_port

    for name in args.configs.split(","):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks)]
        cmd += ["--master_port", str(_free_port()), "-m", "bench.bench_zero3_step", "--repeats", str(args.repeats)]
        cmd += ["--demo-dir", demo_dir, "--worker", name, out, *args.overrides]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    rows = [json.loads(line) for line in list(open(out))[start:]]
    print(f"\n{'config':<14} {'step s':>8} {'rollout':>8} {'exper.':>8} {'update':>8} {'tok exp':>8} {'tok upd':>8}")
    for name in args.configs.split(","):
        rs = [r for r in rows if r["config"] == name]
        med = {k: statistics.median(r["phases_s"][k] for r in rs) for k in ("rollout", "experience", "update")}
        tok = {k: statistics.median(r["tokens"][k] for r in rs) for k in ("experience", "update")}
        step = statistics.median(r["step_s"] for r in rs)
        print(
            f"{name:<14} {step:8.2f} {med['rollout']:8.2f} {med['experience']:8.2f} {med['update']:8.2f} "
            f"{tok['experience']:8.0f} {tok['update']:8.0f}"
        )
    print(f"records: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
