"""Rewards: math correctness (math-verify on the last ``\\boxed{}``), an optional format bonus and
user functions given as ``module:function`` or ``path/to/file.py:function``.

A user function is called as ``fn(response, answer, question)`` and returns a number. A function
that raises or runs past ``timeout_s`` scores 0 for that rollout; both are counted in the returned
statistics and logged (the first few with their message), never silently.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import logging
import os
import re
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("cepo.reward")

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                content = text[i:j].strip()
                return content or None
        j += 1
    return None  # unbalanced: the response was cut off inside the box


def extract_answer(text: str) -> tuple[str | None, str]:
    """The final answer of a response and how it was found.

    Order: the last ``\\boxed{}``; else the number after the last "answer is"/"answer:"; else the
    last number in the text. Returns ``(answer, how)`` with ``how`` in ``{"boxed", "phrase",
    "last_number", "none"}``.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    m = list(re.finditer(r"answer\s*(?:is|:|=)\s*\$?([^\s$]+)", text, flags=re.IGNORECASE))
    if m:
        return m[-1].group(1).rstrip(".,;"), "phrase"
    nums = _NUMBER.findall(text)
    if nums:
        return nums[-1], "last_number"
    return None, "none"


class RewardTimeout(Exception):
    pass


def call_with_timeout(fn: Callable, args: tuple, timeout_s: float):
    """``fn(*args)``, raising :class:`RewardTimeout` after ``timeout_s`` seconds.

    In the main thread on Unix a ``SIGALRM`` timer interrupts the call (math-verify uses signals
    the same way); elsewhere the call runs in a worker thread that is abandoned on timeout.
    """
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):

        def on_alarm(signum, frame):
            raise RewardTimeout(f"timed out after {timeout_s}s")

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(fn, *args).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise RewardTimeout(f"timed out after {timeout_s}s") from None
    finally:
        pool.shutdown(wait=False)


def load_function(spec: str) -> Callable:
    """Import ``module:function`` or ``path/to/file.py:function``.

    Raises:
        ValueError: ``spec`` has no ``:``, the module or file cannot be loaded, or it has no such callable.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"reward function {spec!r}: expected 'module:function' or 'file.py:function'")
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise ValueError(f"reward function {spec!r}: file not found: {target}")
        mod_name = "cepo_user_reward_" + re.sub(r"\W", "_", os.path.abspath(target))
        mod_spec = importlib.util.spec_from_file_location(mod_name, target)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"reward function {spec!r}: cannot import {target!r} ({exc})") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {target} has no callable {name!r}")
    return fn


def math_correct(response: str, answer: str, timeout_s: float = 5.0) -> float:
    """1.0 if the last ``\\boxed{}`` of ``response`` equals ``answer`` under math-verify, else 0.0."""
    pred = extract_boxed(response)
    if pred is None:
        return 0.0
    if pred.strip() == answer.strip():
        return 1.0
    from math_verify import parse, verify

    timeout = max(1, int(round(timeout_s)))
    gold = parse(f"${answer}$", parsing_timeout=timeout)
    guess = parse(f"${pred}$", parsing_timeout=timeout)
    if not gold or not guess:
        return 0.0
    return 1.0 if verify(gold, guess, timeout_seconds=timeout) else 0.0


class RewardModel:
    """All configured reward terms; ``__call__`` scores a batch and returns per-term statistics.

    ``cfg`` is a :class:`cepo.config.RewardConfig`.
    """

    MAX_LOGGED = 5

    def __init__(self, cfg):
        self.cfg = cfg
        self.terms: list[tuple[str, Callable, float]] = []
        if cfg.math_verify:
            # import math-verify (and sympy) here, not inside the first timed call: on a busy machine
            # the import alone can outlast timeout_s, and an alarm raised mid-import leaves a
            # half-initialised sympy in sys.modules that breaks every later user (torch included)
            import math_verify  # noqa: F401

            self.terms.append(("math", lambda r, a, q: math_correct(r, a, cfg.timeout_s), 1.0))
        if cfg.format_weight:
            self.terms.append(("format", lambda r, a, q: float(extract_boxed(r) is not None), cfg.format_weight))
        for spec in cfg.functions:
            self.terms.append((spec, load_function(spec), 1.0))
        if not self.terms:
            raise ValueError("reward: no reward term configured (reward.math_verify is false and no functions)")
        self.errors = 0  # cumulative, over the run
        self.timeouts = 0
        self._logged = 0

    def __call__(self, responses: list[str], answers: list[str], questions: list[str]) -> tuple[list[float], dict]:
        """Rewards (one per response) and ``{"reward_errors", "reward_timeouts", "reward/<term>"}``."""
        totals = [0.0] * len(responses)
        stats = {"reward_errors": 0, "reward_timeouts": 0}
        for name, fn, weight in self.terms:
            term_sum = 0.0
            for i, (resp, ans, q) in enumerate(zip(responses, answers, questions)):
                try:
                    value = float(call_with_timeout(fn, (resp, ans, q), self.cfg.timeout_s))
                    if value != value:  # NaN
                        raise ValueError("returned NaN")
                except RewardTimeout as exc:
                    value = 0.0
                    stats["reward_timeouts"] += 1
                    self._warn(name, i, exc)
                except Exception as exc:  # a user function's bug must not stop training
                    value = 0.0
                    stats["reward_errors"] += 1
                    self._warn(name, i, exc)
                totals[i] += weight * value
                term_sum += value
            stats[f"reward/{name}"] = term_sum / max(1, len(responses))
        self.errors += stats["reward_errors"]
        self.timeouts += stats["reward_timeouts"]
        return totals, stats

    def _warn(self, name: str, i: int, exc: Exception) -> None:
        if self._logged < self.MAX_LOGGED:
            log.warning("reward %r scored 0 for rollout %d: %s: %s", name, i, type(exc).__name__, exc)
            self._logged += 1
            if self._logged == self.MAX_LOGGED:
                log.warning("further reward failures are counted in metrics (reward_errors, reward_timeouts) only")
