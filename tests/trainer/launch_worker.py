"""``cepo`` itself, with rollouts that depend only on the prompt (used by the launcher tests).

``python -m tests.trainer.launch_worker [--local_rank=N] train CONFIG.yaml [key=value ...] [--resume]``,
alone or under ``torchrun`` / ``deepspeed`` / an emulated ``srun``: the real command line, set-up,
loop and checkpoints, with :class:`tests.trainer.dp_worker.PromptSeededRollouts` in place of
sampling, so any number of ranks sees the same global batch and the final weights must agree.
"""

from __future__ import annotations

import sys

from cepo import cli, train
from tests.trainer.dp_worker import PromptSeededRollouts


def _seeded_backend(cfg, model, tokenizer, device, synced_gpus=False):
    vocab = tokenizer.convert_tokens_to_ids(list("0123456789+-=abc\\{}"))
    return PromptSeededRollouts(tokenizer.eos_token_id, vocab)


if __name__ == "__main__":
    train.build_rollout_backend = _seeded_backend
    sys.exit(cli.main())
