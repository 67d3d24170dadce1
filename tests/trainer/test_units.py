"""Pure pieces of the trainer: lam schedule, r- selection, answer extraction, config, data, rewards, loss."""

from __future__ import annotations

import math
import os

import pytest
import torch

from cepo.advantages import lam_at, select_negatives
from cepo.config import load_config
from cepo.data import PromptStream, load_rows
from cepo.loss import ppo_loss
from cepo.reward import RewardModel, extract_answer, extract_boxed, load_function
from tests.trainer.conftest import write_jsonl


# ------------------------------------------------------------------ lam schedule
@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lam_table_steps_1_to_T_plus_2(schedule):
    T, lam0 = 4, 0.8
    table = [lam_at(k, lam0, schedule, T) for k in range(1, T + 3)]
    expected = {
        "linear": [0.8, 0.6, 0.4, 0.2, 0.0, 0.0],
        "cosine": [0.8 * 0.5 * (1 + math.cos(math.pi * (k - 1) / T)) for k in range(1, T + 1)] + [0.0, 0.0],
        "constant": [0.8, 0.8, 0.8, 0.8, 0.0, 0.0],
    }[schedule]
    assert table == pytest.approx(expected, abs=1e-12)
    assert table[0] == lam0 and table[T] == 0.0 and table[T + 1] == 0.0


def test_lam_without_decay_is_constant_and_rejects_step_0():
    assert [lam_at(k, 0.5, "linear", 0) for k in (1, 10, 1000)] == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="step"):
        lam_at(0, 0.5, "linear", 3)


# ------------------------------------------------------------------ answers and r-
@pytest.mark.parametrize(
    "text, answer, how",
    [
        ("3+4=7\n\\boxed{7}", "7", "boxed"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed"),
        ("so the answer is 42.", "42", "phrase"),
        ("Answer: -3", "-3", "phrase"),
        ("5+4=9\n9-2=7", "7", "last_number"),  # no \boxed{}: the last number
        ("cut off \\boxed{12", "12", "last_number"),  # an unclosed box is not an answer
        ("no digits here", None, "none"),
    ],
)
def test_extract_answer_with_and_without_boxed(text, answer, how):
    assert extract_answer(text) == (answer, how)


def test_extract_boxed_balances_braces():
    assert extract_boxed("x \\boxed{\\sqrt{2}+{1}} y") == "\\sqrt{2}+{1}"
    assert extract_boxed("nothing") is None


def test_select_negatives_lowest_rejected_and_fallbacks():
    G = 4
    rewards = [
        1.0,
        0.2,
        0.0,
        0.0,  # group 0: lowest 0.0 at index 2 (earliest of the tie)
        1.0,
        1.0,
        1.0,
        1.0,  # group 1: no rejected rollout
        0.0,
        0.3,
        1.0,
        1.0,  # group 2: lowest (8) has no answer -> next lowest (9)
        0.0,
        0.1,
        1.0,
        1.0,
    ]  # group 3: no rejected rollout has an answer
    texts = [
        "\\boxed{5}",
        "\\boxed{6}",
        "it is 7",
        "\\boxed{8}",
        "a",
        "b",
        "c",
        "d",
        "no answer",
        "the answer is 11",
        "\\boxed{5}",
        "\\boxed{5}",
        "nothing",
        "still nothing",
        "\\boxed{1}",
        "\\boxed{1}",
    ]
    got = select_negatives(rewards, texts, G, threshold=0.5)
    assert [(c.index, c.answer, c.reason) for c in got] == [
        (2, "7", "ok"),
        (None, None, "no_rejected"),
        (9, "11", "ok"),
        (None, None, "no_answer"),
    ]


def test_reject_threshold_is_configurable():
    rewards, texts = [0.6, 0.9, 0.7, 1.0], ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}"]
    assert select_negatives(rewards, texts, 4, threshold=0.5)[0].reason == "no_rejected"
    assert select_negatives(rewards, texts, 4, threshold=0.8)[0].answer == "1"


# ------------------------------------------------------------------ config
def test_config_unknown_key_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: m\ndata:\n  train_file: t.jsonl\nrollout:\n  group_sise: 4\n")
    with pytest.raises(ValueError, match="rollout.group_sise"):
        load_config(str(path))
    with pytest.raises(ValueError, match="optim.lrr"):
        load_config(None, ["model.path=m", "data.train_file=t", "optim.lrr=1"])


def test_config_missing_file_and_missing_values_and_bad_values(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="model.path"):
        load_config(None, ["data.train_file=t"])
    with pytest.raises(ValueError, match="algorithm.name"):
        load_config(None, ["model.path=m", "data.train_file=t", "algorithm.name=ppo"])
    with pytest.raises(ValueError, match="rollout.group_size"):
        load_config(None, ["model.path=m", "data.train_file=t", "rollout.group_size=four"])
    with pytest.raises(ValueError, match="algorithm.eps_w"):
        load_config(None, ["model.path=m", "data.train_file=t", "algorithm.eps_w=1.5"])
    cfg = load_config(None, ["model.path=m", "data.train_file=t", "optim.clip_high=0.3", "optim.dual_clip=3"])
    assert cfg.optim.clip_high == 0.3 and cfg.optim.dual_clip == 3.0 and cfg.optim.clip_low == 0.2


# ------------------------------------------------------------------ data
def test_bad_data_rows_name_file_and_row(tmp_path):
    good = {"question": "q", "answer": "1"}
    bad_json = write_jsonl(str(tmp_path / "a.jsonl"), [good, good, '{"question": "q", "answer": '])
    with pytest.raises(ValueError, match=r"a\.jsonl: row 3: not valid JSON"):
        load_rows(bad_json, "question", "answer")
    empty = write_jsonl(str(tmp_path / "b.jsonl"), [good, {"question": "q", "answer": ""}])
    with pytest.raises(ValueError, match=r"b\.jsonl: row 2: empty or missing 'answer'"):
        load_rows(empty, "question", "answer")
    missing = write_jsonl(str(tmp_path / "c.jsonl"), [{"problem": "q", "answer": "1"}])
    with pytest.raises(ValueError, match=r"c\.jsonl: row 1: no field 'question'"):
        load_rows(missing, "question", "answer")
    assert load_rows(missing, "problem", "answer") == [("q", "1")]
    with pytest.raises(FileNotFoundError, match="d.jsonl"):
        load_rows(str(tmp_path / "d.jsonl"), "question", "answer")


def test_csv_and_parquet_load(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"question": ["1+1", "2+2"], "answer": [2, 4]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        assert load_rows(str(tmp_path / name), "question", "answer") == [("1+1", "2"), ("2+2", "4")]


def test_prompt_stream_is_deterministic_and_resumable():
    a = PromptStream(10, seed=3)
    first = a.next(7)
    state = a.state()
    rest = a.next(9)  # crosses into the next epoch
    b = PromptStream(10, seed=3)
    b.load_state(state)
    assert b.next(9) == rest
    assert sorted(first + rest[:3]) == list(range(10))
    assert PromptStream(10, seed=4).next(10) != PromptStream(10, seed=3).next(10)


# ------------------------------------------------------------------ rewards
def test_raising_and_slow_reward_functions_score_zero_and_are_counted(tmp_path, caplog):
    from cepo.config import RewardConfig

    rm = RewardModel(RewardConfig(math_verify=False, functions=["tests.trainer.rewards:raises_on_odd"]))
    rewards, stats = rm(["ab", "abc", "abcd", "a"], ["1"] * 4, ["q"] * 4)
    assert rewards == [1.0, 0.0, 1.0, 0.0]
    assert stats["reward_errors"] == 2 and rm.errors == 2
    assert "odd length" in caplog.text

    rm = RewardModel(RewardConfig(math_verify=False, functions=["tests.trainer.rewards:sleeps"], timeout_s=0.2))
    rewards, stats = rm(["x"], ["1"], ["q"])
    assert rewards == [0.0] and stats["reward_timeouts"] == 1


def test_reward_function_from_file_and_math_verify(tmp_path):
    from cepo.config import RewardConfig

    f = tmp_path / "my_reward.py"
    f.write_text("def length(response, answer, question):\n    return len(response) / 10\n")
    rm = RewardModel(RewardConfig(math_verify=True, format_weight=0.5, functions=[f"{f}:length"]))
    rewards, stats = rm(["\\boxed{0.5}", "\\boxed{3}", "12"], ["\\frac{1}{2}", "4", "12"], ["q"] * 3)
    # math + 0.5 * format + length / 10
    assert rewards == pytest.approx([1 + 0.5 + 1.1, 0 + 0.5 + 0.9, 0 + 0 + 0.2])
    assert stats["reward_errors"] == 0
    with pytest.raises(ValueError, match="no callable 'nope'"):
        load_function(f"{f}:nope")
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_function("just_a_name")
    with pytest.raises(ValueError, match="file not found"):
        load_function(str(tmp_path / "missing.py") + ":f")


# ------------------------------------------------------------------ loss
def _loss_reference(logp, old, adv, mask, cl, ch, dual):
    """float64 per-token PPO loss written out element by element."""
    out = torch.zeros_like(logp, dtype=torch.float64)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            r = math.exp(float(logp[i, t]) - float(old[i, t]))
            a = float(adv[i, t])
            v = max(-a * r, -a * min(max(r, 1 - cl), 1 + ch))
            if dual is not None and a < 0:
                v = min(v, -a * dual)
            out[i, t] = v
    return out


@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_ppo_loss_matches_reference(dual, agg):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.8
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[:, 0] = True
    ref = _loss_reference(logp, old, adv, mask, 0.2, 0.28, dual)
    if agg == "token_mean":
        expected = ref.sum() / mask.sum()
        norm = float(mask.sum())
    else:
        expected = (ref.sum(-1) / mask.sum(-1)).sum() / 3
        norm = 3.0
    loss, stats = ppo_loss(logp, old, adv, mask, normalizer=norm, dual_clip=dual, loss_agg=agg)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert stats["tokens"].item() == mask.sum().item()


def test_ppo_loss_gradient_is_minus_advantage_at_ratio_one():
    logp = -torch.rand(2, 3, dtype=torch.float64) - 0.1
    logp.requires_grad_(True)
    adv = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, _ = ppo_loss(logp, logp.detach(), adv, mask, normalizer=6.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 6.0)


def test_kl_term_is_zero_at_the_reference_and_positive_elsewhere():
    logp = -torch.rand(2, 4, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    zero = torch.zeros(2, 4, dtype=torch.float64)
    _, s = ppo_loss(logp, logp, zero, mask, normalizer=8.0, ref_logp=logp.clone(), kl_coef=0.1)
    assert s["kl"].item() == 0.0
    _, s = ppo_loss(logp, logp, zero, mask, normalizer=8.0, ref_logp=logp - 0.3, kl_coef=0.1)
    assert s["kl"].item() > 0


def test_demo_problems_are_consistent(tmp_path):
    from cepo import demo

    paths = demo.make_data(str(tmp_path), seed=0, n_sft=20, n_rl=20, n_eval=20)
    for name in ("sft", "train", "eval"):
        rows = load_rows(paths[name], "question", "answer")
        assert len(rows) == 20
    import json

    for line in open(paths["sft"]):
        row = json.loads(line)
        expr = row["question"][len("Compute ") : -1]
        assert str(eval(expr)) == row["answer"]  # + and - only, left to right == Python's order
        assert extract_boxed(row["solution"]) == row["answer"]
        assert row["sft_solution"] in (row["solution"], row["flawed_solution"])
        assert extract_boxed(row["flawed_solution"]) == row["solution"].split("\n")[0].split("=")[1]
    assert os.path.getsize(paths["eval"]) > 0
