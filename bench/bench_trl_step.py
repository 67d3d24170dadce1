"""A ``CEPOTrainer`` step against a ``GRPOTrainer`` step in TRL, side by side in one run, on the
demo model and batch, and the teacher pass's share of the CEPO step.

``python -m bench.bench_trl_step [--repeats 3] [--threads 1] [--clock cpu] [--out DIR]`` runs on the
CPU: the demo's warm-started 0.8M-parameter Qwen3 and its data (built under ``--demo-dir``, default
``runs/demo``, with ``--sft-steps`` warm-start steps if missing), the batch of ``configs/demo.yaml``
(32 prompts x 8 completions of at most 32 tokens, temperature 1, math-verify reward, lam = 1),
fp32. Three trainers, the same seed (so step k samples the same prompts in each): TRL's
``GRPOTrainer``, ``CEPOTrainer`` with the packed teacher pass and with the padded one. One warm-up
step, then ``--repeats`` timed optimizer steps (generation, rewards, teacher pass, loss, backward
and optimizer step, as TRL runs them). Prints the median step time, the teacher pass's median time
and share of the CEPO step, and CEPO / GRPO; appends one JSON line per step and one summary line
to ``bench/results/<machine>-trl-step.jsonl`` (and ``DIR/bench_trl_step.jsonl`` with ``--out``),
with versions, git sha, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default="runs/demo", help="demo assets (built if missing)")
    p.add_argument("--sft-steps", type=int, default=300, help="warm-start steps when the assets are built here")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="summary from wall or process CPU time")
    p.add_argument("--out", default=None, help="also append the records to DIR/bench_trl_step.jsonl")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.common import environment, save_records
    from cepo import demo
    from cepo.integrations.trl import CEPOConfig, CEPOTrainer
    from cepo.reward import math_correct

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = os.path.join(args.demo_dir, "base_model")
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        demo.build_assets(args.demo_dir, sft_steps=args.sft_steps)
    data = load_dataset("json", data_files=os.path.join(args.demo_dir, "train.jsonl"), split="train")
    data = data.map(lambda r: {"prompt": [{"role": "user", "content": f"{r['question']} {demo.DEMO_INSTRUCTION}"}]})

    def correct(completions, answer, **kwargs):
        return [math_correct(c[0]["content"], a) for c, a in zip(completions, answer)]

    class StepClock(TrainerCallback):
        """Wall and process CPU time of every optimizer step."""

        def __init__(self):
            self.steps = []

        def on_step_begin(self, *a, **k):
            self.t0 = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            self.steps.append((time.perf_counter() - self.t0[0], time.process_time() - self.t0[1]))

    teacher = []  # (wall, cpu) of each CEPO teacher pass (r- choice, packed or padded pass, A_t)
    original = CEPOTrainer._cepo_advantages

    def timed_teacher(self, *a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        out = original(self, *a, **k)
        teacher.append((time.perf_counter() - t0, time.process_time() - c0))
        return out

    CEPOTrainer._cepo_advantages = timed_teacher

    work = tempfile.mkdtemp(prefix="bench_trl_")
    common = dict(
        per_device_train_batch_size=256,
        num_generations=8,
        max_completion_length=32,
        temperature=1.0,
        learning_rate=5e-5,
        max_steps=1 + args.repeats,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    cepo_keys = dict(cepo_lam=1.0, cepo_teacher_template="\nAnswer: {answer}\n")
    runs = {
        "grpo": (GRPOTrainer, GRPOConfig(output_dir=os.path.join(work, "grpo"), **common)),
        "cepo_packed": (
            CEPOTrainer,
            CEPOConfig(output_dir=os.path.join(work, "packed"), cepo_packing="true", **common, **cepo_keys),
        ),
        "cepo_padded": (
            CEPOTrainer,
            CEPOConfig(output_dir=os.path.join(work, "padded"), cepo_packing="false", **common, **cepo_keys),
        ),
    }
    env = {**environment(), "trl": trl.__version__, "threads": torch.get_num_threads(), "demo_dir": args.demo_dir}
    records = []
    for name, (cls, cfg) in runs.items():
        clock, teacher[:] = StepClock(), []
        trainer = cls(
            model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            reward_funcs=correct,
            args=cfg,
            train_dataset=data,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            callbacks=[clock],
        )
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        for k in range(1, len(clock.steps)):  # step 0 is the warm-up
            rec = {
                "bench": "trl_step",
                "trainer": name,
                "step": k + 1,
                "step_s": clock.steps[k][0],
                "step_cpu_s": clock.steps[k][1],
                "teacher_s": teacher[k][0] if teacher else 0.0,
                "teacher_cpu_s": teacher[k][1] if teacher else 0.0,
                "completion_length": logs[k].get("completions/mean_length"),
                "reward": logs[k].get("reward"),
                "prompts": 256 // 8,
                "group": 8,
                **env,
            }
            records.append(rec)
            print(json.dumps(rec), flush=True)
        del trainer

    i = 1 if args.clock == "cpu" else 0

    def med(name: str, key: str) -> float:
        key = key.replace("_s", "_cpu_s") if i else key
        vals = [r[key] for r in records if r["trainer"] == name]
        return statistics.median(vals) if vals else float("nan")

    print(f"\nmedian {args.clock} seconds per optimizer step (32 prompts x 8 completions, <= 32 tokens)")
    print(f"{'':14}{'step':>8}{'teacher':>9}{'share':>8}")
    for name in runs:
        step, tpass = med(name, "step_s"), med(name, "teacher_s")
        print(f"{name:14}{step:8.2f}{tpass:9.2f}{tpass / step:8.1%}")
    summary = {
        "bench": "trl_step_ratios",
        "clock": args.clock,
        "cepo_packed_over_grpo": med("cepo_packed", "step_s") / med("grpo", "step_s"),
        "cepo_padded_over_grpo": med("cepo_padded", "step_s") / med("grpo", "step_s"),
        "teacher_share_packed": med("cepo_packed", "teacher_s") / med("cepo_packed", "step_s"),
        "teacher_share_padded": med("cepo_padded", "teacher_s") / med("cepo_padded", "step_s"),
        **env,
    }
    for k, v in summary.items():
        if isinstance(v, float):
            print(f"{k:28} {v:.3f}")
    records.append(summary)
    save_records(records, results=f"{env['machine']}-trl-step.jsonl", out_dir=args.out, name="bench_trl_step")
    print(
        f"reproduce: python -m bench.bench_trl_step --demo-dir {args.demo_dir} --sft-steps {args.sft_steps} "
        f"--repeats {args.repeats} --threads {args.threads} --clock {args.clock}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
