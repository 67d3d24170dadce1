"""Equivalent configurations give the same parameters (in-process, world size 1)."""

from __future__ import annotations

import pytest
import torch

from cepo.advantages import NegativeChoice, grpo_advantages
from cepo.config import load_config
from cepo.experience import Experience
from cepo.scoring import PaddedPasses, build_batch
from cepo.train import Trainer
from tests.trainer.conftest import make_config, params


def run_one_step(assets, tmp_path, name, trainer_cls=Trainer, **kw):
    cfg = load_config(make_config(assets, str(tmp_path / name), **kw))
    trainer = trainer_cls(cfg)
    metrics = trainer.step(1)
    return params(trainer.engine.module), metrics, trainer


def assert_params_equal(a, b, *, exact: bool, atol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


PACKING = ["true", "false"]


@pytest.mark.parametrize("packing", PACKING)
def test_cepo_lam0_equals_grpo_bitwise_and_skips_teacher(assets, tmp_path, monkeypatch, packing):
    grpo, _, t0 = run_one_step(assets, tmp_path, "grpo", algorithm__name="grpo", scoring__packing=packing)
    assert t0.packed == (packing == "true")
    before = params(Trainer(load_config(make_config(assets, str(tmp_path / "fresh")))).engine.module)
    assert any(not torch.equal(grpo[k], before[k]) for k in grpo)  # the step did change the weights

    def no_teacher(*a, **k):
        raise AssertionError("teacher pass ran with lam = 0")

    monkeypatch.setattr(Experience, "teacher_ids", no_teacher)
    monkeypatch.setattr(Experience, "choose_negatives", no_teacher)
    cepo, metrics, _ = run_one_step(
        assets, tmp_path, "cepo", algorithm__name="cepo", algorithm__lam=0.0, scoring__packing=packing
    )
    assert metrics["lam"] == 0.0 and "cepo/clipped_weight_frac" not in metrics
    assert_params_equal(grpo, cepo, exact=True)


class OldPolicyNegative(Experience):
    """CEPO whose every group falls back to the old policy as the negative (RLSD's)."""

    def choose_negatives(self, rollouts):
        return [NegativeChoice(None, None, "no_answer") for _ in rollouts.prompts]


class OldPolicyNegativeTrainer(Trainer):
    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.experience.__class__ = OldPolicyNegative


@pytest.mark.parametrize("packing", PACKING)
def test_cepo_with_old_policy_negative_equals_rlsd(assets, tmp_path, packing):
    kw = dict(algorithm__lam=0.7, scoring__packing=packing)
    rlsd, m_rlsd, _ = run_one_step(assets, tmp_path, "rlsd", algorithm__name="rlsd", **kw)
    cepo, m_cepo, _ = run_one_step(assets, tmp_path, "cepo", OldPolicyNegativeTrainer, algorithm__name="cepo", **kw)
    assert m_rlsd["cepo/clipped_weight_frac"] == m_cepo["cepo/clipped_weight_frac"]
    assert m_cepo["cepo/no_answer_frac"] == 1.0
    assert_params_equal(rlsd, cepo, exact=True)
    grpo, _, _ = run_one_step(assets, tmp_path, "grpo", algorithm__name="grpo", scoring__packing=packing)
    assert any(not torch.equal(grpo[k], rlsd[k]) for k in grpo)  # the teacher term did something


class SameAnswerNegative(Experience):
    """CEPO whose r- is the ground truth itself (r+ == r-)."""

    def choose_negatives(self, rollouts):
        return [NegativeChoice(g * rollouts.group_size, a, "ok") for g, a in enumerate(rollouts.answers)]


@pytest.mark.parametrize("packing", PACKING)
def test_same_positive_and_negative_answer_leaves_grpo_advantages(assets, tmp_path, packing):
    """r+ == r-: the two teacher contexts are identical, delta = 0 and A_t = A (bit for bit when
    padded: the same batch twice; packed, r+ and r- are different segments of one row, whose
    attention sums round differently, so to float32 rounding)."""
    cfg = load_config(make_config(assets, str(tmp_path / "x"), scoring__packing=packing))
    trainer = Trainer(cfg)
    trainer.experience.__class__ = SameAnswerNegative
    rollouts = trainer.generate(1)
    rollouts.rewards = torch.tensor([0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.0, 0.75])
    scored = trainer.experience.score(trainer.engine.module, rollouts, 1.0)
    adv = grpo_advantages(rollouts.rewards, 4)
    expected = torch.where(scored.mask, adv[:, None].expand_as(scored.mask), torch.zeros(()))
    assert scored.mask.any()
    if packing == "false":
        assert torch.equal(scored.advantages, expected)
        assert torch.equal(scored.weights, torch.ones_like(scored.weights))
    else:
        torch.testing.assert_close(scored.advantages, expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(scored.weights, torch.ones_like(scored.weights), rtol=1e-5, atol=0)


# Adam's first step is about lr * sign(g): tiny float differences in g move a weight by a small
# fraction of lr (1e-2 here); 1e-5 is 0.1% of a step. The gradient norms agree much more tightly.
STEP_ATOL = 1e-5


@pytest.mark.parametrize("packing", PACKING)
def test_grad_accumulation_1x8_equals_8x1(assets, tmp_path, packing):
    # packed micro-batches hold whole groups (G = 4): 8 rollouts = 2 groups, 1 -> one group each
    one, m1, _ = run_one_step(assets, tmp_path, "1x8", optim__micro_batch_size=8, scoring__packing=packing)
    eight, m8, t = run_one_step(assets, tmp_path, "8x1", optim__micro_batch_size=1, scoring__packing=packing)
    assert t.grad_accum == (8 if packing == "false" else 2)
    assert m1["grad_norm"] == pytest.approx(m8["grad_norm"], rel=1e-5)
    assert m1["loss"] == pytest.approx(m8["loss"], rel=1e-4, abs=1e-7)
    assert_params_equal(one, eight, exact=False, atol=STEP_ATOL)


@pytest.mark.parametrize("packing", PACKING)
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_grad_accumulation_invariant_for_each_aggregation(assets, tmp_path, loss_agg, packing):
    kw = dict(optim__loss_agg=loss_agg, algorithm__name="grpo", scoring__packing=packing)
    a, ma, _ = run_one_step(assets, tmp_path, "a", optim__micro_batch_size=8, **kw)
    b, mb, _ = run_one_step(assets, tmp_path, "b", optim__micro_batch_size=2, scoring__micro_batch_tokens=1, **kw)
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)
    assert_params_equal(a, b, exact=False, atol=STEP_ATOL)


def test_old_logprobs_do_not_depend_on_micro_batch(assets, tmp_path):
    cfg = load_config(make_config(assets, str(tmp_path / "x")))
    trainer = Trainer(cfg)
    ex = trainer.examples[:3]
    responses = trainer.rollout.generate([e.prompt_ids for e in ex], 2, seed=5).tokens
    batch = build_batch([e.prompt_ids for e in ex for _ in range(2)], responses, trainer.tokenizer.pad_token_id)
    out = []
    for mbs in (6, 1):
        cfg.optim.micro_batch_size = mbs
        out.append(
            PaddedPasses(cfg, trainer.tokenizer.pad_token_id, "cpu", fused_head=False).logprobs(
                trainer.engine.module, batch
            )
        )
    a, b = out
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a[~batch.mask] == 0).all() and (a[batch.mask] < 0).all()
