"""Two RL steps per variant under ``torchrun``, parameters gathered and saved (the ZeRO-3 tests).

``python -m tests.trainer.zero3_worker CONFIG.yaml OUT.pt VARIANTS.json``: ``VARIANTS.json`` is a
list of ``{"name", "overrides", "direct", "rollouts"}``. Each variant builds a fresh
:class:`cepo.train.Trainer` from ``CONFIG.yaml`` + ``overrides`` and runs steps 1 and 2 with
deterministic rollouts: ``"seeded"`` (:class:`tests.trainer.dp_worker.PromptSeededRollouts`: the
same global batch on any number of ranks) or ``"by_rank"`` (rank 0 answers with 10 tokens, the
others with 1: the ranks' packs differ in size, so a token budget splits them differently).
``"direct": true`` turns the forward redirection off (the update calls the decoder directly: the
ZeRO-3 trap the tests pin). Rank 0 saves ``{name: {"params", "start", "loss", "tokens", "packed",
"splits"}}``; ``splits`` holds every rank's natural pack counts (before agreeing).
"""

from __future__ import annotations

import gc
import json
import sys

import torch
import torch.distributed as dist

from cepo import scoring
from cepo.config import load_config
from cepo.rollout import Samples
from cepo.train import Trainer
from tests.trainer.dp_worker import PromptSeededRollouts


class LengthByRank:
    """Rank 0: 10-token responses; other ranks: 1 token (then EOS)."""

    def __init__(self, eos_id: int, token: int, rank: int):
        self.eos_id, self.token, self.length = eos_id, token, 10 if rank == 0 else 1

    def sync_weights(self, model) -> None:
        pass

    def generate(self, prompts, n, seed):
        return Samples([[self.token] * self.length + [self.eos_id] for _ in prompts for _ in range(n)])


def gathered_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter, full (ZeRO-3 partitions gathered), float32 on the CPU."""
    params = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {k: v.detach().float().cpu().clone() for k, v in params}
    return {k: v.detach().float().cpu().clone() for k, v in params}


def run(config: str, variant: dict) -> dict:
    splits: list[int] = []
    split = scoring.PackedPasses.split

    def counting(self, sizes):
        runs = split(self, sizes)
        splits.append(len(runs))
        return runs

    scoring.PackedPasses.split = counting
    direct = scoring.through_engine
    if variant.get("direct"):  # the trap: gradient passes call the decoder without engine.forward
        scoring.through_engine = lambda model, fn, *a, **k: fn(getattr(model, "module", model), *a, **k)
    try:
        trainer = Trainer(load_config(config, variant["overrides"]))
        tok = trainer.tokenizer
        if variant.get("rollouts") == "by_rank":
            trainer.rollout = LengthByRank(tok.eos_token_id, tok.convert_tokens_to_ids("7"), trainer.rank)
        else:
            vocab = tok.convert_tokens_to_ids(list("0123456789+-=abc\\{}"))
            trainer.rollout = PromptSeededRollouts(tok.eos_token_id, vocab)
        start = gathered_params(trainer.engine)
        metrics = [trainer.step(k) for k in (1, 2)]
        tokens = torch.tensor([float(sum(m["tokens/update"] for m in metrics))])
        if dist.is_initialized():
            dist.all_reduce(tokens)
        out = {
            "params": gathered_params(trainer.engine),
            "start": start,
            "loss": [m["loss"] for m in metrics],
            "tokens": int(tokens.item()),  # decoder tokens of the update passes, all ranks and steps
            "packed": trainer.packed,
        }
        every = [None] * trainer.world
        dist.all_gather_object(every, splits)
        out["splits"] = every
        del trainer
        gc.collect()
        return out
    finally:
        scoring.PackedPasses.split = split
        scoring.through_engine = direct


def main(config: str, out: str, variants: str) -> None:
    results = {}
    for variant in json.loads(open(variants).read()):
        results[variant["name"]] = run(config, variant)
    if dist.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
