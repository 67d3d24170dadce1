"""Rollouts: ``G`` sampled responses per prompt, behind a small interface.

A backend implements :class:`RolloutBackend`. :class:`HFGenerateBackend` uses
``transformers``' ``generate`` (sampling with temperature and top-p, KV cache); a vLLM backend
would implement the same ``generate`` and a ``sync_weights`` hook.
"""

from __future__ import annotations

from typing import Protocol

import torch


class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], n: int, seed: int) -> list[list[int]]:
        """``len(prompts) * n`` responses (token ids, ending with EOS when the model stopped),
        grouped: responses ``i * n ... (i + 1) * n - 1`` answer ``prompts[i]``."""

    def sync_weights(self, model) -> None:
        """Make the next ``generate`` use ``model``'s current weights."""


class HFGenerateBackend:
    """Sampling with ``model.generate``; the policy model itself, so weights are always in sync.

    ``cfg`` is a :class:`cepo.config.RolloutConfig`; ``synced_gpus`` must be True under ZeRO-3 with
    several ranks (every rank then runs the same number of forward passes).
    """

    def __init__(self, model, tokenizer, cfg, *, device, synced_gpus: bool = False, greedy: bool = False):
        self.model, self.cfg, self.device, self.synced_gpus, self.greedy = model, cfg, device, synced_gpus, greedy
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = _eos_ids(tokenizer, model)

    def sync_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        rows = [p for p in prompts for _ in range(n)]
        out: list[list[int]] = []
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(rows), self.cfg.generation_batch_size):
            chunk = rows[start : start + self.cfg.generation_batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=self.device)
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            kwargs = (
                dict(do_sample=False)
                if self.greedy
                else dict(do_sample=True, temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=0)
            )
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=self.cfg.max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                use_cache=True,
                synced_gpus=self.synced_gpus,
                **kwargs,
            )
            for row in gen[:, width:].tolist():
                out.append(_cut(row, self.eos_ids, self.pad_id))
        self.model.train(was_training)
        return out


def _eos_ids(tokenizer, model) -> list[int]:
    ids = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("tokenizer: no eos_token_id; set one so that generation can stop")
    return ids


def _cut(row: list[int], eos_ids: list[int], pad_id: int) -> list[int]:
    """Response up to and including the first EOS; without EOS, up to the padding."""
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[: i + 1]
    while row and row[-1] == pad_id:
        row = row[:-1]
    return row
