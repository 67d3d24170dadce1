"""The packed one-pass path under DeepSpeed ZeRO-3, with real processes (2 ranks, gloo).

One ``torchrun`` of :mod:`tests.trainer.zero3_worker` runs every ZeRO-3 variant (2 RL steps each, 4
prompts x 4 rollouts, one group per micro-batch: 2 micro-batches per rank and optimizer step); the
references run in this process (ZeRO-0, one rank: 4 micro-batches). The same global batch everywhere
(prompt-seeded rollouts), so the parameters must agree up to fp32 rounding (:func:`fp32_bound`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cepo.config import load_config
from cepo.engine import _free_port
from tests.trainer.conftest import ROOT, make_config, subprocess_env
from tests.trainer.zero3_worker import run

STEPS, LR = 2, 1e-2
RUN = dict(
    rollout__prompts_per_step=4,
    optim__micro_batch_size=4,  # 4 // G = 1 group per micro-batch
    algorithm__name="cepo",
    steps=STEPS,
    optim__lr=LR,
    engine__dist_timeout_s=60,  # a rank that waits for a forward the other never runs fails, not hangs
)
U = 2.0**-24  # fp32 unit roundoff


def fp32_bound(tokens: int, width: int, layers: int) -> float:
    """Largest parameter difference two runs may show when they differ only in the order of their
    fp32 sums (ranks, micro-batches, packed or padded rows, BLAS blocking).

    A weight's gradient is a sum over the step's ``tokens`` decoder tokens of products ``delta * x``,
    where ``delta`` came back through ``layers + 1`` contractions (the LM head, then each layer) of at
    most ``width`` terms (hidden, MLP or vocabulary width). First-order error analysis (errors of
    successive stages add; no catastrophic cancellation): a relative difference of at most
    ``rho = n u / (1 - n u)`` with ``n = tokens + (layers + 1) * width`` and ``u = 2^-24``. Grad clipping
    scales all gradients by one factor with the same relative error. AdamW's step
    ``lr * m_hat / (sqrt(v_hat) + eps)`` then changes by at most ``lr * 1.5 rho * |m_hat / sqrt(v_hat)|``
    (``rho`` through ``m``, ``rho / 2`` through ``sqrt(v)``), with ``|m_hat / sqrt(v_hat)| <=
    (1 - b1) / sqrt(1 - b2) ~ 3.2`` in the first steps. Over ``STEPS`` steps ``STEPS * lr * 4.8 rho``,
    doubled for what the first step's difference does to the second step's gradients (second order).
    """
    n = tokens + (layers + 1) * width
    rho = n * U / (1 - n * U)
    return 2 * STEPS * LR * 1.5 * 3.2 * rho


@pytest.fixture(scope="module")
def untied(assets, tmp_path_factory) -> str:
    """The test model with an LM head of its own (``tie_word_embeddings=False``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = str(tmp_path_factory.mktemp("untied"))
    cfg = AutoConfig.from_pretrained(assets["model"])
    cfg.tie_word_embeddings = False
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig.from_pretrained(assets["model"])
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(out)
    return out


_REFERENCES: dict = {}


def reference(config: str, overrides: list[str]) -> dict:
    """Two steps in this process (one rank, ZeRO-0) with the same rollouts as the worker."""
    key = (config, tuple(overrides))
    if key not in _REFERENCES:
        _REFERENCES[key] = run(config, {"name": "ref", "overrides": overrides})
    return _REFERENCES[key]


@pytest.fixture(scope="module")
def zero3(assets, untied, tmp_path_factory) -> dict:
    """Every ZeRO-3 variant, 2 ranks, one torchrun; plus the one-rank references."""
    work = str(tmp_path_factory.mktemp("zero3"))
    config = make_config(assets, os.path.join(work, "run"), **RUN)
    z3 = ["engine.zero_stage=3", "scoring.packing=true"]
    variants = [
        {"name": "tied", "overrides": z3},
        {"name": "tied_direct", "overrides": z3, "direct": True},
        {"name": "untied", "overrides": z3 + [f"model.path={untied}"]},
        {"name": "lora", "overrides": z3 + ["model.lora=true", "model.lora_r=4", "model.lora_alpha=8"]},
        {"name": "checkpointing", "overrides": ["engine.zero_stage=3", "model.gradient_checkpointing=true"]},
        {"name": "offload", "overrides": z3 + ["engine.offload_param=true", "engine.offload_optimizer=true"]},
        {
            "name": "by_rank",
            "overrides": z3 + ["scoring.micro_batch_tokens=150", "algorithm.name=grpo"],
            "rollouts": "by_rank",
        },
    ]
    spec = os.path.join(work, "variants.json")
    with open(spec, "w") as f:
        json.dump(variants, f)
    out = os.path.join(work, "zero3.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += ["-m", "tests.trainer.zero3_worker", config, out, spec]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = torch.load(out, weights_only=False)
    results["config"] = config
    return results


def _max_diff(a: dict, b: dict) -> tuple[float, str]:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max().item(), k) for k in a)


def _bound(config: str, *results: dict) -> float:
    """:func:`fp32_bound` for the model of ``config`` and the most tokens any of ``results`` ran."""
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(load_config(config).model.path)
    width = max(mc.hidden_size, mc.intermediate_size, mc.vocab_size)
    return fp32_bound(max(r["tokens"] for r in results), width, mc.num_hidden_layers)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["tied", "untied"])
def test_zero3_packed_equals_zero0_packed_and_padded(zero3, untied, head):
    """ZeRO-3 packed (2 ranks x 2 micro-batches) == ZeRO-0 packed == ZeRO-0 padded (1 rank x 4)."""
    config = zero3["config"]
    path = [f"model.path={untied}"] if head == "untied" else []
    packed = reference(config, path + ["scoring.packing=true"])
    padded = reference(config, path + ["scoring.packing=false"])
    got = zero3[head]
    assert got["packed"] and packed["packed"] and not padded["packed"]
    bound = _bound(config, got, packed, padded)  # the same shapes tied and untied
    for ref in (packed, padded):
        diff, name = _max_diff(got["params"], ref["params"])
        assert diff <= bound, f"{head}: {name} differs by {diff:.3g} > {bound:.3g}"
    moved, _ = _max_diff(got["params"], padded["start"])
    assert moved > 100 * bound  # the steps did move the weights, far beyond the rounding bound


@pytest.mark.slow
def test_zero3_direct_decoder_call_keeps_only_the_last_micro_batch(zero3):
    """Pinned trap: without ``engine.forward`` ZeRO-3 never advances its micro-step, so the gradient
    of each micro-batch overwrites the previous one; the result is far outside the rounding bound."""
    config = zero3["config"]
    ref = reference(config, ["scoring.packing=true"])
    bound = _bound(config, zero3["tied"], zero3["tied_direct"], ref)
    wrong, name = _max_diff(zero3["tied_direct"]["params"], ref["params"])
    assert wrong > 100 * bound, f"the direct call matched ({name}: {wrong:.3g}): is the trap gone from DeepSpeed?"
    right, _ = _max_diff(zero3["tied"]["params"], ref["params"])
    assert right <= bound


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["offload", "checkpointing"])
def test_zero3_with_offload_or_gradient_checkpointing_equals_zero0(zero3, variant):
    """``offload_param`` + ``offload_optimizer`` (packed), or gradient checkpointing (``packing=auto``
    falls back to the padded passes: the packed tree attention is not re-entered when a layer is
    recomputed): the same weights as ZeRO-0 packed. The padded run also needs the ranks to agree on
    their forward count: the ranks' ``r-`` rows (a teacher pass of its own) differ in number."""
    config = zero3["config"]
    ref = reference(config, ["scoring.packing=true"])
    got = zero3[variant]
    diff, name = _max_diff(got["params"], ref["params"])
    assert got["packed"] == (variant == "offload") and diff <= _bound(config, got, ref), f"{name}: {diff:.3g}"


@pytest.mark.slow
def test_zero3_lora_equals_zero0_lora(zero3):
    config = zero3["config"]
    ref = reference(config, ["model.lora=true", "model.lora_r=4", "model.lora_alpha=8", "scoring.packing=true"])
    got = zero3["lora"]
    assert got["packed"]
    diff, name = _max_diff(got["params"], ref["params"])
    assert diff <= _bound(config, got, ref), f"{name}: {diff:.3g}"
    frozen = [k for k in ref["params"] if "lora_" not in k]
    assert all(torch.equal(got["params"][k], ref["start"][k]) for k in frozen)  # only adapters train


@pytest.mark.slow
def test_zero3_ranks_with_different_pack_counts_do_not_hang(zero3):
    """Rank 0 answers with 10 tokens, rank 1 with 1: under a 150-token budget (GRPO: a prompt and
    its 4 responses per group) rank 0 needs two packs and rank 1 one, in the scoring pass and in
    the update; the counts are agreed (the rank with fewer splits its largest pack) and both ranks
    finish both steps (a collective that one rank never joins would fail after the 60 s timeout)."""
    got = zero3["by_rank"]
    rank0, rank1 = got["splits"]  # natural pack counts per split call: scoring, update, scoring, update
    assert rank0 == [2, 2, 2, 2] and rank1 == [1, 1, 1, 1], got["splits"]
    assert all(math.isfinite(v) for v in got["loss"])
