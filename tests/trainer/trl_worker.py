"""One CEPOTrainer step on fixed completions, run by ``tests/trainer/test_trl.py`` in 1 or 2 processes.

``python -m tests.trainer.trl_worker MODEL_DIR TRAIN_JSONL OUT_PREFIX ROWS_PER_PROCESS [ALGORITHM]``
(under ``accelerate launch`` for 2 processes). The completions come from a ``rollout_func`` that
picks, for global completion ``k``, candidate ``k % G`` of its prompt, so 1 and 2 processes see
the same global batch; each process writes ``OUT_PREFIX.rank<R>.json``: every row TRL's loss
received, as ``[prompt text, completion text, advantages]``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from cepo import demo
from cepo.integrations.trl import CEPOConfig, CEPOTrainer
from cepo.reward import extract_answer

G = 4


def candidates(question: str, answer: str) -> list[str]:
    """``G`` completions of one prompt: right, two wrong answers and one without a number; every
    third question (by its characters) gets ``G`` right ones (a group without a rejected one)."""
    a = int(answer)
    if sum(map(ord, question)) % 3 == 0:
        return [f"{a}\n\\boxed{{{a}}}", f"\\boxed{{{a}}}", f"={a}", f"so {a}"]
    return [f"{a}\n\\boxed{{{a}}}", f"\\boxed{{{a + 1}}}", "no idea", f"{a}-1=\\boxed{{{a - 1}}}"]


def correct(completions, answer, **kwargs) -> list[float]:
    """1 when the completion's final answer equals the ground truth."""
    return [float(extract_answer(c[0]["content"])[0] == a) for c, a in zip(completions, answer)]


def main(argv: list[str]) -> None:
    model_dir, train_file, out_prefix, rows = argv[0], argv[1], argv[2], int(argv[3])
    algorithm = argv[4] if len(argv) > 4 else "cepo"
    torch.set_num_threads(1)
    data = [json.loads(line) for line in open(train_file)]
    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": f"{r['question']} {demo.DEMO_INSTRUCTION}"}], "answer": r["answer"]}
            for r in data
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_prompt = {f"{r['question']} {demo.DEMO_INSTRUCTION}": r for r in data}

    def rollout(prompts, trainer):
        start = trainer.accelerator.process_index * len(prompts)
        prompt_ids, completion_ids = [], []
        for i, prompt in enumerate(prompts):
            row = by_prompt[prompt[-1]["content"]]
            text = candidates(row["question"], row["answer"])[(start + i) % G]
            prompt_ids.append(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False))
            completion_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    args = CEPOConfig(
        output_dir=out_prefix + ".run",
        per_device_train_batch_size=rows,
        num_generations=G,
        max_completion_length=16,
        max_steps=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        cepo_algorithm=algorithm,
        cepo_lam=1.0,
        cepo_teacher_template="\nAnswer: {answer}\n",
        cepo_kernel_backend="torch",
    )
    seen = []

    class Recording(CEPOTrainer):
        def _compute_loss(self, model, inputs):
            mask = inputs["completion_mask"].bool()
            for b in range(inputs["completion_ids"].shape[0]):
                prompt = tokenizer.decode(inputs["prompt_ids"][b][inputs["prompt_mask"][b].bool()])
                completion = tokenizer.decode(inputs["completion_ids"][b][mask[b]])
                seen.append([prompt, completion, inputs["advantages"][b][mask[b]].tolist()])
            return super()._compute_loss(model, inputs)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Recording(
        model=model,
        reward_funcs=correct,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=rollout,
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(f"{out_prefix}.rank{rank}.json", "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    main(sys.argv[1:])
