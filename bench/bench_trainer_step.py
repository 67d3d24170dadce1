"""GRPO and CEPO steps, packed (``scoring.packing=true``) and padded (``false``), time per phase.

``python -m bench.bench_trainer_step --shape tiny [--out DIR]`` runs the embedded default on the
CPU: the demo's warm-started 0.8M-parameter Qwen3, its data and ``configs/demo.yaml`` (32 prompts x 8
rollouts, math-verify reward), built under ``--demo-dir`` (default ``runs/demo``) if missing.
``--shape qwen3-1.7b`` (GPU only; ZeRO-2, bf16, one process) uses a random-init
Qwen3-1.7B-shaped policy with the real 151936-token vocabulary, ``--prompts`` x ``--group``
rollouts of exactly ``--new-tokens`` tokens (a random model rarely stops) and a random reward in
[0, 1] (so advantages and CEPO's ``r-`` exist).

For each of the four configurations one warm-up step, then ``--repeats`` timed steps (the same
seed, so step k samples the same prompts everywhere). Prints the median step and phase times
(rollout, reward, experience = old policy + teachers, update), the tokens run through the decoder
per phase, and the ratios: CEPO / GRPO (packed and padded), packed / padded experience and step.
Each measured step appends one JSON line to ``DIR/bench_trainer_step.jsonl`` (and, on a GPU, to
``bench/results/<gpu>.jsonl``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

SHAPES = {
    # Qwen3-1.7B: 28 layers, d=2048, 16 query / 8 KV heads of 128, MLP 6144, vocab 151936, tied embeddings
    "qwen3-1.7b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=4096,
    ),
}


def random_reward(response: str, answer: str, question: str) -> float:
    """Reward for timing only: uniform in [0, 1], from the response text (deterministic)."""
    return random.Random(hash(response) & 0xFFFFFFFF).random()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for bench_trainer_step.jsonl")
    p.add_argument("--shape", default="qwen3-1.7b", choices=[*sorted(SHAPES), "tiny"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="summary ratios from wall time or process CPU time"
    )
    p.add_argument("--demo-dir", default="runs/demo", help="--shape tiny: demo assets (built if missing)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and args.shape != "tiny":
        print("bench_trainer_step: needs a CUDA GPU (run with --shape tiny for a CPU smoke test); skipping")
        return 0
    on_gpu = torch.cuda.is_available()

    import statistics

    import cepo.train as train_mod
    from bench.common import environment, save_records
    from cepo import demo
    from cepo.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tempfile.mkdtemp(prefix="bench_trainer_")
    if args.shape == "tiny":  # the embedded default: demo assets and config
        model_json = os.path.join(args.demo_dir, "base_model", "model.safetensors")
        if not os.path.isfile(model_json):
            demo.build_assets(args.demo_dir)
        config = os.path.join(root, "configs", "demo.yaml")
        base = [
            f"model.path={os.path.join(args.demo_dir, 'base_model')}",
            f"data.train_file={os.path.join(args.demo_dir, 'train.jsonl')}",
        ]
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        paths = demo.make_data(work, seed=0, n_sft=1, n_rl=256, n_eval=1)
        tok_dir = os.path.join(work, "tokenizer")
        tokenizer = demo.build_tokenizer(tok_dir)
        shape = dict(SHAPES[args.shape])

        def random_policy(cfg, for_training=True):
            torch.manual_seed(0)
            config = Qwen3Config(
                tie_word_embeddings=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None,
                **shape,
            )
            with torch.device("cuda" if on_gpu else "cpu"):
                model = Qwen3ForCausalLM(config)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            return model.float()

        train_mod.load_policy = random_policy
        config = None
        base = [
            f"model.path={tok_dir}",
            f"data.train_file={paths['train']}",
            "algorithm.lam=1.0",
            "algorithm.lam_decay_steps=0",
            f"rollout.prompts_per_step={args.prompts}",
            f"rollout.group_size={args.group}",
            f"rollout.max_new_tokens={args.new_tokens}",
            f"rollout.generation_batch_size={args.prompts * args.group}",
            f"optim.micro_batch_size={args.micro_batch}",
            "optim.lr=1e-6",
            f"engine.zero_stage={args.zero_stage}",
            f"engine.precision={'bf16' if on_gpu else 'fp32'}",
            "reward.math_verify=false",
            "reward.functions=[bench.bench_trainer_step:random_reward]",
        ]
    if args.threads:
        torch.set_num_threads(args.threads)

    @contextmanager
    def timed(timings: dict, name: str):  # the trainer's phase timer, plus the process's CPU time
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        timings[f"time/{name}"] = timings.get(f"time/{name}", 0.0) + time.perf_counter() - t0
        timings[f"cpu/{name}"] = timings.get(f"cpu/{name}", 0.0) + time.process_time() - c0

    train_mod.timed = timed
    env = environment()
    records = []
    for packing in ("true", "false"):
        for algo in ("grpo", "cepo"):
            overrides = base + [
                f"output_dir={os.path.join(work, f'{algo}-{packing}')}",
                f"algorithm.name={algo}",
                f"scoring.packing={packing}",
                "progress_bar=false",
                f"steps={1 + args.repeats}",
                "save_every=0",
                "data.eval_file=null",
            ]
            trainer = train_mod.Trainer(load_config(config, overrides))
            if args.shape != "tiny":  # the random model must not stop early: an EOS id sampled with p ~ 1/V
                trainer.rollout.eos_ids = [shape["vocab_size"] - 1]
            for k in range(1, 2 + args.repeats):
                if on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0, c0 = time.perf_counter(), time.process_time()
                m = trainer.step(k)
                if on_gpu:
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                if k == 1:
                    continue  # warm-up
                rec = {
                    "bench": "trainer_step",
                    "algorithm": algo,
                    "packing": packing == "true",
                    "shape": args.shape,
                    "zero_stage": trainer.cfg.engine.zero_stage,
                    "precision": trainer.cfg.engine.precision,
                    "prompts": trainer.cfg.rollout.prompts_per_step,
                    "group": trainer.cfg.rollout.group_size,
                    "step": k,
                    "step_s": wall,
                    "phases_s": {k2[5:]: v for k2, v in m.items() if k2.startswith("time/")},
                    "step_cpu_s": cpu,
                    "phases_cpu_s": {k2[4:]: v for k2, v in m.items() if k2.startswith("cpu/")},
                    "tokens": {k2[7:]: m[k2] for k2 in ("tokens/experience", "tokens/update")},
                    "response_length": m["response_length"],
                    "lam": m["lam"],
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
                    "threads": torch.get_num_threads(),
                    **env,
                }
                records.append(rec)
                print(json.dumps(rec), flush=True)
            del trainer, m
            gc.collect()  # one engine's weights and optimizer state must go before the next is built
            if on_gpu:
                torch.cuda.empty_cache()

    clock = "cpu" if args.clock == "cpu" else "wall"

    def med(algo, packed, key=None):
        rows = [r for r in records if r["algorithm"] == algo and r["packing"] == packed]
        step, phases = ("step_cpu_s", "phases_cpu_s") if clock == "cpu" else ("step_s", "phases_s")
        vals = [r[step] if key is None else r[phases].get(key, 0.0) for r in rows]
        return statistics.median(vals) if vals else float("nan")

    def toks(algo, packed, key):
        rows = [r for r in records if r["algorithm"] == algo and r["packing"] == packed]
        return statistics.median(r["tokens"][key] for r in rows) if rows else float("nan")

    print(f"\nmedian {clock} seconds per step and phase, tokens through the decoder per phase")
    print(f"{'':18}{'step':>8}{'rollout':>9}{'reward':>8}{'exper.':>8}{'update':>8}{'tok exp':>9}{'tok upd':>9}")
    for packed in (True, False):
        for algo in ("grpo", "cepo"):
            name = f"{algo} {'packed' if packed else 'padded'}"
            phases = "".join(f"{med(algo, packed, p):8.2f}" for p in ("rollout", "reward", "experience", "update"))
            print(
                f"{name:18}{med(algo, packed):8.2f} {phases}"
                f"{toks(algo, packed, 'experience'):9.0f}{toks(algo, packed, 'update'):9.0f}"
            )
    ratios = {
        "cepo_packed_over_grpo_packed": med("cepo", True) / med("grpo", True),
        "cepo_padded_over_grpo_padded": med("cepo", False) / med("grpo", False),
        "cepo_experience_packed_over_padded": med("cepo", True, "experience") / med("cepo", False, "experience"),
        "cepo_step_packed_over_padded": med("cepo", True) / med("cepo", False),
        "cepo_experience_tokens_packed_over_padded": toks("cepo", True, "experience")
        / toks("cepo", False, "experience"),
    }
    for k, v in ratios.items():
        print(f"{k:45} {v:.3f}")
    records.append({"bench": "trainer_step_ratios", "shape": args.shape, "clock": clock, **ratios, **env})
    results = f"{env['machine']}.jsonl" if on_gpu else None
    save_records(records, results=results, out_dir=args.out, name="bench_trainer_step")
    print(
        f"reproduce: python -m bench.bench_trainer_step --shape {args.shape} --repeats {args.repeats} "
        f"--threads {args.threads} --clock {args.clock}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
