"""One GRPO step and one CEPO step of a random-init Qwen3-1.7B-shaped policy, time per phase.

GPU only (ZeRO-2, bf16, one process): ``python -m bench.bench_trainer_step --out DIR``. On a
machine without CUDA it says so and exits 0, unless ``--shape tiny`` (a CPU smoke run of the same
code path). Each measured step appends one JSON line (phase times, peak memory, versions) to
``DIR/bench_trainer_step.jsonl`` and ``bench/results/<gpu>.jsonl``.

Set-up: ``--prompts`` prompts x ``--group`` rollouts of exactly ``--new-tokens`` tokens (a random
model rarely stops), a random reward in [0, 1] (so advantages and CEPO's ``r-`` exist), the
character tokenizer of the demo and the real 151936-token vocabulary. After one warm-up step of
each algorithm, ``--repeats`` steps of each are timed, alternating.
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
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=151936,
        max_position_embeddings=1024,
    ),
}


def random_reward(response: str, answer: str, question: str) -> float:
    """Reward for timing only: uniform in [0, 1], from the response text (deterministic)."""
    return random.Random(hash(response) & 0xFFFFFFFF).random()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for bench_trainer_step.jsonl")
    p.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=2)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and args.shape != "tiny":
        print("bench_trainer_step: needs a CUDA GPU (run with --shape tiny for a CPU smoke test); skipping")
        return 0
    on_gpu = torch.cuda.is_available()

    from transformers import Qwen3Config, Qwen3ForCausalLM

    import cepo.train as train_mod
    from cepo import demo
    from cepo.config import load_config

    work = tempfile.mkdtemp(prefix="bench_trainer_")
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
    records = []
    trainers = {}
    for algo in ("grpo", "cepo"):
        overrides = [
            f"model.path={tok_dir}",
            f"data.train_file={paths['train']}",
            f"output_dir={os.path.join(work, algo)}",
            f"algorithm.name={algo}",
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
            "progress_bar=false",
            f"steps={2 + args.repeats}",
            "save_every=0",
        ]
        trainers[algo] = overrides
    from bench.common import environment

    env = environment()
    for algo, overrides in trainers.items():
        trainer = train_mod.Trainer(load_config(None, overrides))
        # the random model must not stop early: an EOS id outside the tokenizer, sampled with p ~ 1/151936
        trainer.rollout.eos_ids = [shape["vocab_size"] - 1]
        for k in range(1, 2 + args.repeats):
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            m = trainer.step(k)
            if on_gpu:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            if k == 1:
                continue  # warm-up
            rec = {
                "bench": "trainer_step",
                "algorithm": algo,
                "shape": args.shape,
                "zero_stage": args.zero_stage,
                "precision": "bf16" if on_gpu else "fp32",
                "prompts": args.prompts,
                "group": args.group,
                "new_tokens": args.new_tokens,
                "micro_batch": args.micro_batch,
                "step_s": wall,
                "phases_s": {k2[5:]: v for k2, v in m.items() if k2.startswith("time/")},
                "response_length": m["response_length"],
                "lam": m["lam"],
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
                **env,
            }
            records.append(rec)
            print(json.dumps(rec))
        del trainer, m
        gc.collect()  # the GRPO engine's weights and optimizer state must go before CEPO's are built
        if on_gpu:
            torch.cuda.empty_cache()
    by = {a: [r["step_s"] for r in records if r["algorithm"] == a] for a in ("grpo", "cepo")}
    if by["grpo"] and by["cepo"]:
        g, c = min(by["grpo"]), min(by["cepo"])
        print(f"GRPO step {g:.2f}s, CEPO step {c:.2f}s: CEPO costs {100 * (c / g - 1):+.1f}% wall clock")
    targets = (
        [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{env['machine']}.jsonl")]
        if on_gpu
        else []
    )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        targets.append(os.path.join(args.out, "bench_trainer_step.jsonl"))
    for path in targets:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
