"""``cepo.integrations.trl`` against real TRL on the CPU: a tiny random-init Qwen3 and a character
tokenizer (the ``assets`` fixture), TRL's own generation, rewards and loss.

- ``cepo_lam = 0`` trains exactly like ``GRPOTrainer`` (loss and parameters after 2 steps).
- ``cepo_lam > 0``: the advantages TRL's loss receives equal ``cepo_kernels.contrastive_advantage``
  of teacher log-probs from plain forwards of ``[prompt, teacher(r+), y]`` and the negative
  context (``[prompt, teacher(r-), y]`` with ``r-`` picked by ``select_negatives``, or ``[prompt, y]``),
  packed and padded, CEPO and RLSD.
- 2 processes (``accelerate launch``, gloo) with a group split between them == 1 process.
- PEFT (LoRA): packed == padded, base weights frozen.
- Clear errors: TRL version, answer column, ``num_generations``, bad keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import cepo_kernels  # noqa: E402
from cepo import demo  # noqa: E402
from cepo.advantages import select_negatives  # noqa: E402
from cepo.integrations import trl as cepo_trl  # noqa: E402
from cepo.integrations.trl import CEPOConfig, CEPOTrainer  # noqa: E402
from tests.trainer import trl_worker  # noqa: E402
from tests.trainer.conftest import ROOT, params, subprocess_env  # noqa: E402

TEMPLATE = "\nAnswer: {answer}\n"
G = 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")


def dataset(path: str, n: int | None = None) -> Dataset:
    rows = [json.loads(line) for line in open(path)][:n]
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": f"{r['question']} {demo.DEMO_INSTRUCTION}"}], "answer": r["answer"]}
            for r in rows
        ]
    )


def digits(completions, **kwargs) -> list[float]:
    """A reward a random model earns: the fraction of digits among the first 8 characters."""
    return [sum(ch.isdigit() for ch in c[0]["content"][:8]) / 8.0 for c in completions]


def large_solved(completions, answer, **kwargs) -> list[float]:
    """1 for every completion of prompts whose answer exceeds 15 (groups without a rejected
    completion), else :func:`digits`."""
    return [1.0 if int(a) > 15 else d for a, d in zip(answer, digits(completions))]


def config(tmp_path, trainer_cls=CEPOTrainer, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        num_generations=G,
        max_completion_length=12,
        max_steps=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    if trainer_cls is CEPOTrainer:
        base.update(cepo_teacher_template=TEMPLATE, cepo_kernel_backend="torch", cepo_reject_threshold=0.1)
        return CEPOConfig(**{**base, **kw})
    return GRPOConfig(**{**base, **kw})


def trainer(assets, args, cls=CEPOTrainer, reward=digits, **kw):
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    return cls(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset(assets["train"]),
        processing_class=tokenizer,
        **kw,
    )


# ----------------------------------------------------------------------------- lam = 0 is GRPO
def test_lam_zero_trains_exactly_like_grpo(assets, tmp_path):
    runs = {}
    for name, cls, extra in (("grpo", GRPOTrainer, {}), ("cepo", CEPOTrainer, {"cepo_lam": 0.0})):
        t = trainer(assets, config(tmp_path / name, cls, **extra), cls)
        t.train()
        losses = [h["loss"] for h in t.state.log_history if "loss" in h]
        runs[name] = (losses, params(t.model))
    assert len(runs["grpo"][0]) == 2
    assert runs["cepo"][0] == runs["grpo"][0]
    for k, v in runs["grpo"][1].items():
        assert torch.equal(runs["cepo"][1][k], v), k


# ----------------------------------------------------------------------------- lam > 0: A_t from plain forwards
def plain_logprobs(model, context: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """``(len(response),)`` float64 log-probs of ``response`` after ``context``: one plain forward."""
    ids = torch.tensor([context + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(context) - 1 : -1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


class Recording(CEPOTrainer):
    """Records every batch TRL's loss receives, with the expected ``A_t`` computed independently
    (the model is still the one that scored the batch: one generation per optimizer step). The
    plain forwards run on ``self.reference``, a separate copy of the weights outside TRL's bf16
    autocast (the teacher pass runs in the model's own dtype)."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.order = [  # generation order, before TRL shuffles the rows: r- ties go to the earliest
            (tuple(p[pm.bool()].tolist()), tuple(c[cm.bool()].tolist()))
            for p, pm, c, cm in zip(
                output["prompt_ids"], output["prompt_mask"], output["completion_ids"], output["completion_mask"]
            )
        ]
        return output

    def _compute_loss(self, model, inputs):
        self.recorded.append(expected_advantages(self, inputs))
        return super()._compute_loss(model, inputs)


def expected_advantages(trainer, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """``(got, want, mask, reasons)`` for one loss batch (rows in TRL's shuffled order)."""
    args, tok, model = trainer.args, trainer.processing_class, trainer.reference
    model.load_state_dict(trainer.model.state_dict())
    pm, cm = inputs["prompt_mask"].bool(), inputs["completion_mask"].bool()
    rows = []
    for b in range(inputs["prompt_ids"].shape[0]):
        prompt = inputs["prompt_ids"][b][pm[b]].tolist()
        completion = inputs["completion_ids"][b][cm[b]].tolist()
        rows.append((prompt, completion, tok.decode(completion, skip_special_tokens=True)))
    # groups: the rows sharing a prompt (a batch holds distinct prompts)
    groups: dict[tuple, list[int]] = {}
    for b, (prompt, _, _) in enumerate(rows):
        groups.setdefault(tuple(prompt), []).append(b)
    for members in groups.values():
        members.sort(key=lambda b: trainer.order.index((tuple(rows[b][0]), tuple(rows[b][1]))))
    assert all(len(v) == G for v in groups.values())
    answers = trainer.answers
    T = inputs["completion_ids"].shape[1]
    want = torch.zeros(len(rows), T, dtype=torch.float64)
    reasons = []
    for prompt, members in groups.items():
        completions = [[{"role": "assistant", "content": rows[b][2]}] for b in members]
        rewards = trainer.reward_funcs[0](completions=completions, answer=[answers[prompt]] * len(members))
        rewards = torch.tensor(rewards, dtype=torch.float64)
        seq_adv = (rewards - rewards.mean()) / (rewards.std() + 1e-4)  # TRL's scale_rewards="group"
        choice = select_negatives(rewards.tolist(), [rows[b][2] for b in members], G, args.cepo_reject_threshold)[0]
        reasons.append(choice.reason)
        teacher = tok(TEMPLATE.format(answer=answers[prompt]), add_special_tokens=False)["input_ids"]
        for b, a in zip(members, seq_adv):
            y = rows[b][1]
            pos = plain_logprobs(model, list(prompt) + teacher, y, args.temperature)
            if args.cepo_algorithm == "cepo" and choice.reason == "no_rejected" and args.cepo_no_rejected == "grpo":
                want[b, : len(y)] = a  # the negative is r+ itself: A_t = A exactly
                continue
            if args.cepo_algorithm == "cepo" and choice.reason == "ok":
                r_minus = tok(TEMPLATE.format(answer=choice.answer), add_special_tokens=False)["input_ids"]
                neg = plain_logprobs(model, list(prompt) + r_minus, y, args.temperature)
            else:  # RLSD, and CEPO's fallback (no_rejected="rlsd" or no extractable answer): the policy
                neg = plain_logprobs(model, list(prompt), y, args.temperature)
            want[b, : len(y)] = cepo_kernels.contrastive_advantage(
                a.reshape(1), pos[None], neg[None], lam=args.cepo_lam, eps_w=args.cepo_eps_w, backend="torch"
            )[0]
    return inputs["advantages"].detach().double(), want, cm, reasons


def answers_by_prompt_ids(tokenizer, data: Dataset) -> dict[tuple, str]:
    out = {}
    for row in data:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=False)
        out[tuple(ids)] = row["answer"]
    return out


@pytest.mark.parametrize(
    "algorithm,packing,extra",
    [
        ("cepo", "true", {}),
        ("cepo", "false", {}),
        ("rlsd", "true", {}),
        ("cepo", "true", {"cepo_no_rejected": "grpo", "reward": large_solved}),
    ],
    ids=["cepo-packed", "cepo-padded", "rlsd-packed", "cepo-no-rejected-grpo"],
)
def test_advantages_equal_contrastive_advantage_of_plain_forwards(assets, tmp_path, algorithm, packing, extra):
    extra = dict(extra)
    reward = extra.pop("reward", digits)
    args = config(tmp_path, cepo_algorithm=algorithm, cepo_packing=packing, cepo_lam=0.7, cepo_eps_w=0.3, **extra)
    t = trainer(assets, args, Recording, reward=reward)
    t.recorded, t.answers = [], answers_by_prompt_ids(t.processing_class, t.train_dataset)
    t.reference = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    t.train()
    assert len(t.recorded) == 2
    reasons = []
    for got, want, mask, why in t.recorded:
        assert got.shape == want.shape and got.dim() == 2
        torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-5)
        assert any((row[m] != row[m][0]).any() for row, m in zip(got, mask))  # per-token, not GRPO's A
        reasons += why
    if algorithm == "cepo":
        assert "ok" in reasons, reasons  # some group used an r- context
    if reward is large_solved:
        assert "no_rejected" in reasons, reasons  # and some had no rejected completion: A_t = A
    logs = [h for h in t.state.log_history if "loss" in h]
    for key in ("cepo/lam", "cepo/delta_mean_wrong", "cepo/clipped_weight_frac", "cepo/teacher_time"):
        assert key in logs[0], sorted(logs[0])
    assert logs[0]["cepo/lam"] == pytest.approx(0.7)


# ----------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_two_processes_with_a_split_group_match_one(assets, tmp_path):
    """3 groups of 4 over 2 processes of 6 rows: the middle group lies on both."""
    from cepo.engine import _free_port

    worker = ["-m", "tests.trainer.trl_worker", assets["model"], assets["train"]]
    env = {**subprocess_env(), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    one = str(tmp_path / "one")
    threads = torch.get_num_threads()
    try:  # 1 process: here (a second interpreter would only add its start-up)
        trl_worker.main([assets["model"], assets["train"], one, "12"])
    finally:
        torch.set_num_threads(threads)
    two = str(tmp_path / "two")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), *worker, two, "6"]
    subprocess.run(launch, cwd=ROOT, env=env, check=True, timeout=300)

    def rows(paths):
        out = {}
        for p in paths:
            for prompt, completion, adv in json.load(open(p)):
                assert (prompt, completion) not in out
                out[(prompt, completion)] = torch.tensor(adv, dtype=torch.float64)
        return out

    a = rows([one + ".rank0.json"])
    b = rows([two + ".rank0.json", two + ".rank1.json"])
    assert len(a) == 12 and a.keys() == b.keys()
    varied = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
        varied += bool(a[key].numel() > 1 and (a[key] != a[key][0]).any())
    assert varied > 0  # per-token advantages, not GRPO's


# ----------------------------------------------------------------------------- PEFT
def test_peft_lora_packed_equals_padded_and_base_frozen(assets, tmp_path):
    from peft import LoraConfig

    out = {}
    for packing in ("true", "false"):
        args = config(tmp_path / packing, cepo_packing=packing, learning_rate=5e-2)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        t = trainer(assets, args, peft_config=lora)
        before = params(t.model)
        t.train()
        after = params(t.model)
        assert any("lora" in k for k in after)
        for k, v in before.items():
            if "lora" not in k:
                assert torch.equal(after[k], v), k
        assert any(not torch.equal(after[k], before[k]) for k in after if "lora_B" in k)
        out[packing] = after
    for k, v in out["true"].items():
        torch.testing.assert_close(out["false"][k], v, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- clear errors
def test_trl_outside_the_tested_range_is_an_error(assets, tmp_path, monkeypatch):
    args = config(tmp_path)
    monkeypatch.setattr(cepo_trl.trl, "__version__", "1.15.2")
    with pytest.raises(ValueError, match=r"trl 1\.15\.2 .*tested with trl>=1\.16"):
        trainer(assets, args)
    with pytest.raises(ValueError, match=r"trl 1\.15\.2"):
        config(tmp_path)


def test_dataset_without_the_answer_column_is_an_error(assets, tmp_path):
    args = config(tmp_path, cepo_answer_column="solution")
    with pytest.raises(ValueError, match=r"no column 'solution' \(cepo_answer_column"):
        trainer(assets, args)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"num_generations": 1}, r"num_generations: expected >= 2"),
        ({"cepo_algorithm": "grpo"}, r"cepo_algorithm: expected 'cepo' or 'rlsd'"),
        ({"cepo_lam": 1.5}, r"cepo_lam: expected in \[0, 1\]"),
        ({"cepo_no_rejected": "skip"}, r"cepo_no_rejected: expected one of"),
        ({"cepo_teacher_template": "no placeholder"}, r"cepo_teacher_template: must contain"),
        ({"cepo_packing": "maybe"}, r"cepo_packing: expected one of"),
        ({"remove_unused_columns": True}, r"remove_unused_columns=True drops the answer column"),
    ],
    ids=["num_generations", "algorithm", "lam", "no_rejected", "template", "packing", "remove_unused_columns"],
)
def test_bad_settings_are_errors_naming_the_key(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kw)


def test_grpo_config_is_an_error(assets, tmp_path):
    with pytest.raises(ValueError, match="args: expected a CEPOConfig"):
        trainer(assets, config(tmp_path, GRPOTrainer))


# ----------------------------------------------------------------------------- the example
def test_example_script_runs(assets, tmp_path, monkeypatch, capsys):
    """``examples/trl_cepo.py`` (the README's TRL example) for one step on the tiny assets."""
    import runpy

    script = os.path.join(ROOT, "examples", "trl_cepo.py")
    argv = [script, "--model", assets["model"], "--train", assets["train"], "--out", str(tmp_path / "example")]
    monkeypatch.setattr(sys, "argv", argv + ["--max-steps", "1", "--num-generations", "4", "--batch-size", "8"])
    runpy.run_path(script, run_name="__main__")
    assert "'cepo/lam': '1'" in capsys.readouterr().out


def test_docs_example_runs(assets, tmp_path, capsys):
    """The ``python`` block of ``docs/trl.md`` (the README's "CEPO in your TRL script"), on the tiny
    assets for one step: only the paths and the batch are replaced."""
    import re

    text = open(os.path.join(ROOT, "docs", "trl.md")).read()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert block in re.findall(r"```python\n(.*?)```", readme, flags=re.S)  # the README shows this very block
    for old, new in (
        ("runs/demo/base_model", assets["model"]),
        ("runs/demo/train.jsonl", assets["train"]),
        ("runs/trl-cepo", str(tmp_path / "docs-example")),
        ("max_steps=60", "max_steps=1"),
        ("per_device_train_batch_size=256", "per_device_train_batch_size=16"),
    ):
        assert old in block, old
        block = block.replace(old, new)
    exec(compile(block, "docs/trl.md", "exec"), {})  # noqa: S102 - our own documentation
    assert "'cepo/lam': '1'" in capsys.readouterr().out
