"""Reward functions used by the trainer tests (loaded as ``tests.trainer.rewards:NAME``)."""

import time


def digit_count(response: str, answer: str, question: str) -> float:
    """A reward a random model can earn: the fraction of digits among the first 8 characters."""
    head = response[:8]
    return sum(c.isdigit() for c in head) / 8.0


def raises_on_odd(response: str, answer: str, question: str) -> float:
    if len(response) % 2:
        raise RuntimeError("odd length")
    return 1.0


def sleeps(response: str, answer: str, question: str) -> float:
    time.sleep(5.0)
    return 1.0


def solved_by_question(response: str, answer: str, question: str) -> float:
    """1 for every rollout of about half the questions (groups with no rejected rollout), else
    ``digit_count``: both kinds of group in one step."""
    if sum(map(ord, question)) % 2 == 0:
        return 1.0
    return digit_count(response, answer, question)
