"""Samples for inspection: what one RL step computed for a few groups, token by token.

Every ``log_samples_every`` steps (0: never) rank 0 writes ``output_dir/samples/step-XXXXXX.jsonl``,
one JSON object per group for at most ``log_samples_groups`` groups (groups holding both a correct
and a rejected rollout first, since those are the ones whose credit differs):

```
{"step", "group", "algorithm", "lam", "eps_w", "reject_threshold", "question", "answer",
 "r_plus", "r_minus", "negative",                 # the answers in the teacher contexts as used
 "responses": [{"text", "tokens", "token_ids", "reward", "correct", "A",
                "A_t", "delta", "weight", "logp_old", "logp_pos", "logp_neg"}, ...]}
```

``tokens`` are the response's tokens as strings (each id decoded on its own), ``A`` the sequence
advantage, and per token ``A_t`` the advantage the loss used, ``delta = logp_pos - logp_neg``,
``weight`` the clipped weight ``c_t``; ``delta`` / ``weight`` / ``logp_pos`` / ``logp_neg`` are
``null`` when no teacher pass ran (GRPO, or ``lam == 0``). ``negative`` says what the negative
context was: ``"r-"`` (CEPO with an answer ``r_minus``), ``"policy"`` (RLSD, or CEPO's fallback),
``"r+"`` (``no_rejected: grpo``: delta 0) or ``null``. Numbers are the float32 values of the step
written exactly (non-finite values as ``null``), so the file can be checked against the kernels.
"""

from __future__ import annotations

import json
import math
import os


def _floats(row) -> list[float | None]:
    out = []
    for v in row:
        v = float(v)
        out.append(v if math.isfinite(v) else None)
    return out


def choose_groups(rewards: list[float], group_size: int, n: int, reject_threshold: float) -> list[int]:
    """Up to ``n`` group indices: groups with both a correct and a rejected rollout first, in order."""
    groups = len(rewards) // group_size
    mixed, rest = [], []
    for g in range(groups):
        rs = rewards[g * group_size : (g + 1) * group_size]
        (mixed if max(rs) >= reject_threshold > min(rs) else rest).append(g)
    return (mixed + rest)[: max(0, n)]


def build_sample_records(
    *,
    step: int,
    tokenizer,
    questions: list[str],
    answers: list[str],
    responses: list[list[int]],
    texts: list[str],
    rewards,
    seq_adv,
    tok_adv,
    mask,
    group_size: int,
    n_groups: int,
    algorithm: str,
    lam: float,
    eps_w: float,
    reject_threshold: float,
    old_logp=None,
    pos_logp=None,
    neg_logp=None,
    weights=None,
    r_minus: list[str | None] | None = None,
    negative: list[str | None] | None = None,
) -> list[dict]:
    """The records of :mod:`cepo.samples` for ``n_groups`` groups of one step (pure: no I/O).

    Row ``i`` of every per-rollout argument belongs to group ``i // group_size``; ``questions`` and
    ``answers`` are per rollout. Tensors are ``(B,)`` or ``(B, T)`` with ``mask`` marking the
    response tokens; ``r_minus`` / ``negative`` are per group.
    """
    rewards = [float(r) for r in rewards]
    chosen = choose_groups(rewards, group_size, n_groups, reject_threshold)
    records = []
    for g in chosen:
        rows = range(g * group_size, (g + 1) * group_size)
        out = []
        for i in rows:
            n = int(mask[i].sum().item())
            ids = [int(t) for t in responses[i][:n]]
            resp = {
                "text": texts[i],
                "tokens": [tokenizer.decode([t], skip_special_tokens=False) for t in ids],
                "token_ids": ids,
                "reward": rewards[i],
                "correct": rewards[i] >= reject_threshold,
                "A": float(seq_adv[i]),
                "A_t": _floats(tok_adv[i][:n]),
                "delta": None,
                "weight": None,
                "logp_old": None if old_logp is None else _floats(old_logp[i][:n]),
                "logp_pos": None,
                "logp_neg": None,
            }
            if pos_logp is not None and neg_logp is not None:
                resp["logp_pos"] = _floats(pos_logp[i][:n])
                resp["logp_neg"] = _floats(neg_logp[i][:n])
                resp["delta"] = _floats((pos_logp[i][:n] - neg_logp[i][:n]).tolist())
            if weights is not None:
                resp["weight"] = _floats(weights[i][:n])
            out.append(resp)
        i0 = g * group_size
        records.append(
            {
                "step": step,
                "group": g,
                "algorithm": algorithm,
                "lam": float(lam),
                "eps_w": float(eps_w),
                "reject_threshold": float(reject_threshold),
                "question": questions[i0],
                "answer": answers[i0],
                "r_plus": answers[i0] if pos_logp is not None else None,
                "r_minus": None if r_minus is None else r_minus[g],
                "negative": None if negative is None else negative[g],
                "responses": out,
            }
        )
    return records


def samples_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "samples", f"step-{step:06d}.jsonl")


def write_samples(output_dir: str, step: int, records: list[dict]) -> str:
    """``output_dir/samples/step-XXXXXX.jsonl`` (written to a temporary name, then renamed)."""
    path = samples_path(output_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_samples(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def should_log(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def step_records(step: int, cfg, tokenizer, rollouts, scored) -> list[dict]:
    """:func:`build_sample_records` of a trainer step (``cepo.experience.Rollouts`` / ``Scored``)."""
    kinds = None if scored.negatives is None else [n.value for n in scored.negatives]
    return build_sample_records(
        step=step,
        tokenizer=tokenizer,
        questions=rollouts.per_rollout(rollouts.questions),
        answers=rollouts.per_rollout(rollouts.answers),
        responses=rollouts.responses,
        texts=rollouts.texts,
        rewards=rollouts.rewards.tolist(),
        seq_adv=scored.seq_advantages,
        tok_adv=scored.advantages,
        mask=scored.mask,
        group_size=rollouts.group_size,
        n_groups=cfg.log_samples_groups,
        algorithm=cfg.algorithm.name,
        lam=scored.lam,
        eps_w=cfg.algorithm.eps_w,
        reject_threshold=cfg.algorithm.reject_threshold,
        old_logp=scored.old_logp,
        pos_logp=scored.pos,
        neg_logp=scored.neg,
        weights=scored.weights,
        r_minus=scored.r_minus,
        negative=kinds,
    )
