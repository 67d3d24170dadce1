"""Run one RL step with deterministic rollouts and save the parameters (used by the data-parallel test).

``python -m tests.trainer.dp_worker CONFIG.yaml OUT.pt`` (alone or under ``torchrun``): the rollouts
depend only on the prompt, so any number of ranks sees the same global batch.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from cepo.config import load_config
from cepo.rollout import Samples
from cepo.train import Trainer


class PromptSeededRollouts:
    """Responses that depend only on the prompt and the sample index: digits, letters, then EOS."""

    def __init__(self, eos_id: int, vocab: list[int]):
        self.eos_id, self.vocab = eos_id, vocab

    def sync_weights(self, model) -> None:
        pass

    def generate(self, prompts, n, seed):
        out = []
        for p in prompts:
            for j in range(n):
                g = torch.Generator().manual_seed(sum(p) * 31 + len(p) * 7 + j)
                length = int(torch.randint(2, 10, (1,), generator=g))
                picks = torch.randint(0, len(self.vocab), (length,), generator=g).tolist()
                out.append([self.vocab[i] for i in picks] + [self.eos_id])
        return Samples(out)


def main(config: str, out: str) -> None:
    trainer = Trainer(load_config(config))
    tok = trainer.tokenizer
    vocab = tok.convert_tokens_to_ids(list("0123456789+-=abc\\{}"))
    trainer.rollout = PromptSeededRollouts(tok.eos_token_id, vocab)
    metrics = trainer.step(1)
    if not dist.is_initialized() or dist.get_rank() == 0:
        state = {k: v.detach().float().clone() for k, v in trainer.engine.module.named_parameters()}
        torch.save({"params": state, "world": trainer.world, "loss": metrics["loss"], "packed": trainer.packed}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
