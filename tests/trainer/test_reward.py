"""``cepo.reward``: answer extraction and reward functions."""

from __future__ import annotations

import pytest

from cepo.reward import RewardModel, extract_answer, extract_boxed, load_function


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
