"""``cepo.advantages``: the lam schedule, the choice of ``r-`` and the negative context of each group."""

from __future__ import annotations

import math

import pytest

from cepo.advantages import Negative, NegativeChoice, choose_negatives, lam_at, negative_contexts, select_negatives
from cepo.config import AlgorithmConfig


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


def test_negative_contexts_are_decided_once_per_group():
    choices = [
        NegativeChoice(3, "7", "ok"),
        NegativeChoice(None, None, "no_rejected"),
        NegativeChoice(None, None, "no_answer"),
    ]
    assert negative_contexts("cepo", choices, 3, "rlsd") == [Negative.R_MINUS, Negative.POLICY, Negative.POLICY]
    assert negative_contexts("cepo", choices, 3, "grpo") == [Negative.R_MINUS, Negative.R_PLUS, Negative.POLICY]
    assert negative_contexts("rlsd", None, 2, "rlsd") == [Negative.POLICY, Negative.POLICY]
    assert [n.value for n in Negative] == ["r-", "policy", "r+"]  # what samples files and cepo viz show
    with pytest.raises(ValueError, match="choices"):
        negative_contexts("cepo", choices[:2], 3, "rlsd")
    with pytest.raises(ValueError, match="grpo"):
        negative_contexts("grpo", None, 3, "rlsd")


def test_choose_negatives_as_a_step_decides():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    texts = ["\\boxed{4}", "\\boxed{5}", "no answer here", "\\boxed{4}", "\\boxed{2}", "\\boxed{2}"]
    cepo = AlgorithmConfig(name="cepo", no_rejected="grpo")
    negatives, choices = choose_negatives(cepo, 0.5, rewards, texts, 3)
    assert negatives == [Negative.R_MINUS, Negative.R_PLUS]
    assert choices[0].index == 1 and choices[0].answer == "5"
    assert choose_negatives(cepo, 0.0, rewards, texts, 3) == (None, None)  # lam = 0: no teacher pass
    assert choose_negatives(AlgorithmConfig(name="grpo"), 1.0, rewards, texts, 3) == (None, None)
    assert choose_negatives(AlgorithmConfig(name="rlsd"), 1.0, rewards, texts, 3) == ([Negative.POLICY] * 2, None)
