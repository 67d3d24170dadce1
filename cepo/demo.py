"""The embedded default: everything ``make demo`` needs, built locally in a few minutes on 2 CPU cores.

1. A synthetic task: multi-step integer arithmetic ("Compute 7+5-3.", sums and differences of small integers)
   with a worked solution and a verifiable integer answer.
2. A character-level tokenizer built with ``tokenizers`` and saved as a Hugging Face tokenizer
   with a ChatML-style chat template.
3. A tiny random-init Qwen3-architecture model (``transformers.Qwen3Config``).
4. A short supervised warm-start on worked solutions, 60% of which carry a deliberate flaw (the
   box holds the first intermediate result), so the base model solves some problems but not all.
5. RL fine-tuning with CEPO (``configs/demo.yaml``) and a final table of held-out accuracy.

``python -m cepo.demo [--out DIR] [--skip-train]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
DEMO_INSTRUCTION = "Answer in \\boxed{}."


# ----------------------------------------------------------------------------------------- task
def make_problem(rng: random.Random, n_ops: int = 2) -> dict:
    """One problem: ``n_ops`` additions/subtractions (start 1-20, operands 1-9) with its worked solution.

    The flawed solution boxes the second-to-last intermediate result (for the default 2 operations,
    the first): every line of working is right and only the box, the last thing written, is wrong.
    """
    value = rng.randint(1, 20)
    question, lines = str(value), []
    for _ in range(n_ops):
        op = rng.choice("+-")
        operand = rng.randint(1, 9)
        new = value + operand if op == "+" else value - operand
        lines.append(f"{value}{op}{operand}={new}")
        question += f"{op}{operand}"
        value = new
    solution = "\n".join(lines) + f"\n\\boxed{{{value}}}"
    # the flaw some warm-start demonstrations carry: boxing the second-to-last intermediate result
    early = lines[-2].split("=")[1]
    flawed = "\n".join(lines) + f"\n\\boxed{{{early}}}"
    return {"question": f"Compute {question}.", "answer": str(value), "solution": solution, "flawed_solution": flawed}


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_data(
    out: str,
    seed: int = 0,
    n_sft: int = 3000,
    n_rl: int = 1500,
    n_eval: int = 200,
    flawed_fraction: float = 0.6,
    n_ops: int = 2,
) -> dict[str, str]:
    """Disjoint SFT / RL / held-out splits as JSONL files in ``out``; returns their paths.

    Each SFT row's ``sft_solution`` is, with probability ``flawed_fraction``, the flawed one: the
    working is right but the box holds the first intermediate result (like noisy human
    demonstrations). The warm-started model therefore often boxes the wrong number; a verifiable
    reward lets RL remove the habit, which is what the demo shows.
    """
    rng = random.Random(seed)
    seen, splits = set(), {"sft": [], "train": [], "eval": []}
    for name, n in (("eval", n_eval), ("train", n_rl), ("sft", n_sft)):
        while len(splits[name]) < n:
            p = make_problem(rng, n_ops)
            if p["question"] not in seen:
                seen.add(p["question"])
                splits[name].append(p)
    for row in splits["sft"]:
        row["sft_solution"] = row["flawed_solution"] if rng.random() < flawed_fraction else row["solution"]
    paths = {}
    for name, rows in splits.items():
        paths[name] = os.path.join(out, f"{name}.jsonl")
        write_jsonl(rows, paths[name])
    return paths


# ------------------------------------------------------------------------------------ tokenizer
def build_tokenizer(
    out: str | None,
    *,
    special: list[str] = SPECIAL,
    additional: list[str] = ("<|im_start|>",),
    chat_template: str = CHAT_TEMPLATE,
):
    """Character-level tokenizer over printable ASCII and newline after the ``special`` tokens
    (``additional`` of them registered as special), saved as a HF tokenizer to ``out`` (if given)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(special + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # "." does not match newline; the split keeps it as its own piece anyway
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token=None,
        eos_token="<|im_end|>",
        additional_special_tokens=list(additional),
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template
    fast.padding_side = "left"
    if out:
        fast.save_pretrained(out)
    return fast


def build_model(out: str, tokenizer, seed: int = 0, **shape):
    """Tiny random-init Qwen3 (about 0.8M parameters by default; ``shape`` overrides Qwen3Config
    fields), saved with ``save_pretrained``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    dims = dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
    )
    dims.update(shape)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **dims,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    return model


# ----------------------------------------------------------------------------------- warm start
def prompt_text(tokenizer, question: str, instruction: str = DEMO_INSTRUCTION) -> str:
    messages = [{"role": "user", "content": f"{question} {instruction}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def warm_start(
    model, tokenizer, sft_file: str, *, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0, log=print
) -> None:
    """Supervised fine-tuning on worked solutions (loss on the response tokens only), in place."""
    rows = [json.loads(line) for line in open(sft_file)]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = rng.sample(rows, batch_size)
        ids, labels = [], []
        for row in batch:
            p = tokenizer(prompt_text(tokenizer, row["question"]), add_special_tokens=False)["input_ids"]
            r = tokenizer(row["sft_solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids.append(p + r)
            labels.append([-100] * len(p) + r)
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
        label_t = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        attn = (torch.arange(width)[None, :] < torch.tensor([len(x) for x in ids])[:, None]).long()
        loss = model(input_ids=input_ids, attention_mask=attn, labels=label_t).loss
        sft_update(model, opt, sched, loss, step, steps, t0, log)
    model.eval()


def sft_update(model, opt, sched, loss, step: int, steps: int, t0: float, log) -> None:
    """One warm-start update (gradients clipped to norm 1) and a progress line every 50 steps."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if (step + 1) % 50 == 0 or step == 0:
        log(f"  warm-start step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")


# The tasks: "default" (2 operations, `make demo`) and "long" (4 operations: longer chains whose only
# wrong token in a flawed demonstration is the boxed answer at the very end; a harder test of
# per-token credit). Each: problem-generator arguments and the RL overrides the task needs.
TASKS = {
    "default": {"n_ops": 2, "overrides": []},
    "long": {"n_ops": 4, "overrides": ["rollout.max_new_tokens=64"]},
}


def build_assets(
    out: str,
    *,
    sft_steps: int = 300,
    seed: int = 0,
    task: str = "default",
    log=print,
    data_sizes: dict | None = None,
    model_shape: dict | None = None,
    model_dir: str = "base_model",
) -> dict[str, str]:
    """Data, tokenizer and (``sft_steps`` > 0: warm-started) base model under ``out``; returns their
    paths. ``data_sizes`` (``n_sft``, ``n_rl``, ``n_eval``) and ``model_shape`` (Qwen3Config fields)
    override the demo's, for tests."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    os.makedirs(out, exist_ok=True)
    paths = make_data(out, seed=seed, n_ops=TASKS[task]["n_ops"], **(data_sizes or {}))
    model_dir = os.path.join(out, model_dir)
    tokenizer = build_tokenizer(model_dir)
    model = build_model(model_dir, tokenizer, seed=seed, **(model_shape or {}))
    if sft_steps:
        n = sum(p.numel() for p in model.parameters()) / 1e6
        log(f"warm start: {n:.2f}M-parameter Qwen3, {sft_steps} SFT steps")
        warm_start(model, tokenizer, paths["sft"], steps=sft_steps, seed=seed, log=log)
        model.save_pretrained(model_dir)
    paths["model"] = model_dir
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="where assets, checkpoints and metrics go")
    parser.add_argument("--config", default=None, help="RL config (default: configs/demo.yaml)")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--skip-train", action="store_true", help="only build the assets")
    parser.add_argument("--model", default=None, help="train this HF causal-LM directory instead of the tiny one")
    parser.add_argument(
        "--task",
        choices=[*sorted(TASKS), "vision"],
        default="default",
        help="default: 2 operations; long: 4 operations, the decisive token (the boxed answer) late in the response; "
        "vision: visual arithmetic with a tiny Qwen3-VL (cepo/demo_vision.py, configs/demo_vision.yaml)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for the RL config")
    args = parser.parse_args(argv)
    if args.task == "vision":
        from cepo import demo_vision

        return demo_vision.run(args)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    if args.model:  # any local transformers causal LM: only the data is made here
        os.makedirs(args.out, exist_ok=True)
        paths = {**make_data(args.out, n_ops=TASKS[args.task]["n_ops"]), "model": args.model}
    else:
        paths = build_assets(args.out, sft_steps=args.sft_steps, task=args.task)
    print(f"assets built in {time.time() - t0:.0f}s under {args.out}")
    if args.skip_train:
        return 0
    return train_and_report(
        args.config or "demo.yaml", paths, args.out, [*TASKS[args.task]["overrides"], *args.overrides], t0
    )


def train_and_report(config: str, paths: dict, out: str, overrides: list[str], t0: float) -> int:
    """The RL part of a demo: ``cepo train`` with ``config`` (a path, or a file name under
    ``configs/``) on the assets ``paths`` (``model``, ``train``, ``eval``) into ``out/rl``, then the
    held-out accuracy table."""
    from cepo.train import run_from_config

    if not os.path.isfile(config):
        config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", config)
    overrides = [
        f"model.path={paths['model']}",
        f"data.train_file={paths['train']}",
        f"data.eval_file={paths['eval']}",
        f"output_dir={os.path.join(out, 'rl')}",
        *overrides,
    ]
    summary = run_from_config(config, overrides)
    evals = summary["evals"]
    print("\n  step  held-out accuracy")
    for step, acc in evals:
        print(f"  {step:>4}  {acc:6.1%}")
    if evals:
        print(
            f"\nbase accuracy {evals[0][1]:.1%} -> final {evals[-1][1]:.1%} after {summary['steps']} CEPO steps; "
            f"total {time.time() - t0:.0f}s"
        )
    print(f"metrics: {summary['metrics_file']}\nfinal model: {summary['final_model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
