"""CEPO in a TRL script: TRL's GRPO set-up with ``CEPOConfig`` / ``CEPOTrainer`` in place of
``GRPOConfig`` / ``GRPOTrainer``, on the demo assets (``python -m cepo.demo --skip-train`` writes
them to ``runs/demo``).

    python examples/trl_cepo.py                      # runs/demo/base_model, runs/demo/train.jsonl
    python examples/trl_cepo.py --max-steps 2        # a quick look

The settings mirror ``configs/demo.yaml`` (32 prompts x 8 completions, lam 1 -> 0 over 20 steps).
"""

import argparse

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from cepo.integrations.trl import CEPOConfig, CEPOTrainer
from cepo.reward import math_correct


def correct(completions, answer, **kwargs):  # 1 if the last \boxed{} equals the dataset's answer
    return [math_correct(c[0]["content"], a) for c, a in zip(completions, answer)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/base_model")
    p.add_argument("--train", default="runs/demo/train.jsonl")
    p.add_argument("--out", default="runs/trl-cepo")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256, help="completions per step (prompts x generations)")
    a = p.parse_args()

    # --- the 15 lines of the README
    data = load_dataset("json", data_files=a.train, split="train")  # columns: question, answer, ...
    data = data.map(lambda r: {"prompt": [{"role": "user", "content": r["question"] + " Answer in \\boxed{}."}]})
    args = CEPOConfig(
        output_dir=a.out, max_steps=a.max_steps, learning_rate=5e-5, use_cpu=True, report_to=[], logging_steps=1,
        num_generations=a.num_generations, per_device_train_batch_size=a.batch_size, max_completion_length=32,
        cepo_lam=1.0, cepo_lam_decay_steps=20, cepo_teacher_template="\nAnswer: {answer}\n",  # r+ = data["answer"]
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(a.model)
    trainer = CEPOTrainer(
        model=model, reward_funcs=correct, args=args, train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(a.model),
    )  # fmt: skip
    trainer.train()


if __name__ == "__main__":
    main()
