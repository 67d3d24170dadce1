"""Equivalent configurations give the same parameters (in-process, world size 1)."""

from __future__ import annotations

import pytest
import torch

from cepo.advantages import contrastive_token_advantages, grpo_advantages
from cepo.config import load_config
from cepo.logprobs import batched_logprobs, build_batch
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


def test_cepo_lam0_equals_grpo_bitwise_and_skips_teacher(assets, tmp_path, monkeypatch):
    grpo, _, t0 = run_one_step(assets, tmp_path, "grpo", algorithm__name="grpo")
    before = params(Trainer(load_config(make_config(assets, str(tmp_path / "fresh")))).engine.module)
    assert any(not torch.equal(grpo[k], before[k]) for k in grpo)  # the step did change the weights

    def no_teacher(*a, **k):
        raise AssertionError("teacher pass ran with lam = 0")

    monkeypatch.setattr(Trainer, "teacher_ids", no_teacher)
    monkeypatch.setattr(Trainer, "negative_logprobs", no_teacher)
    cepo, metrics, _ = run_one_step(assets, tmp_path, "cepo", algorithm__name="cepo", algorithm__lam=0.0)
    assert metrics["lam"] == 0.0 and "time/logprob_teacher" not in metrics
    assert_params_equal(grpo, cepo, exact=True)


class OldPolicyNegative(Trainer):
    """CEPO whose negative teacher is replaced by the old policy."""

    def negative_logprobs(self, rows, contexts, responses, width, rewards, texts, old_logp, pos):
        return old_logp.clone(), {}


def test_cepo_with_old_policy_negative_equals_rlsd(assets, tmp_path):
    rlsd, m_rlsd, _ = run_one_step(assets, tmp_path, "rlsd", algorithm__name="rlsd", algorithm__lam=0.7)
    cepo, m_cepo, _ = run_one_step(
        assets, tmp_path, "cepo", OldPolicyNegative, algorithm__name="cepo", algorithm__lam=0.7
    )
    assert m_rlsd["cepo/clipped_weight_frac"] == m_cepo["cepo/clipped_weight_frac"]
    assert_params_equal(rlsd, cepo, exact=True)
    grpo, _, _ = run_one_step(assets, tmp_path, "grpo", algorithm__name="grpo")
    assert any(not torch.equal(grpo[k], rlsd[k]) for k in grpo)  # the teacher term did something


def test_same_positive_and_negative_answer_leaves_grpo_advantages(assets, tmp_path):
    """r+ == r-: the two teacher contexts are identical, delta = 0 and A_t = A bit for bit."""
    cfg = load_config(make_config(assets, str(tmp_path / "x")))
    trainer = Trainer(cfg)
    ex = trainer.examples[:2]
    g = 4
    responses = trainer.rollout.generate([e.prompt_ids for e in ex], g, seed=3)
    rows = [e for e in ex for _ in range(g)]
    ctx = [e.prompt_ids + trainer.teacher_ids(e.answer) for e in rows]
    width = max(len(r) for r in responses)
    pos = trainer.logprobs(trainer.engine.module, ctx, responses, width)
    neg = trainer.logprobs(trainer.engine.module, [list(c) for c in ctx], responses, width)
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.0, 0.75])
    adv = grpo_advantages(rewards, g)
    mask = build_batch(ctx, responses, trainer.tokenizer.pad_token_id, width).mask
    tok_adv, weights = contrastive_token_advantages(adv, pos, neg, mask, lam=1.0, eps_w=0.2, backend="torch")
    expected = torch.where(mask, adv[:, None].expand_as(mask), torch.zeros(()))
    assert torch.equal(tok_adv, expected)
    assert torch.equal(weights, torch.ones_like(weights))


# Adam's first step is about lr * sign(g): tiny float differences in g move a weight by a small
# fraction of lr (1e-2 here); 1e-5 is 0.1% of a step. The gradient norms agree much more tightly.
STEP_ATOL = 1e-5


def test_grad_accumulation_1x8_equals_8x1(assets, tmp_path):
    one, m1, _ = run_one_step(assets, tmp_path, "1x8", optim__micro_batch_size=8)
    eight, m8, t = run_one_step(assets, tmp_path, "8x1", optim__micro_batch_size=1)
    assert t.grad_accum == 8
    assert m1["grad_norm"] == pytest.approx(m8["grad_norm"], rel=1e-5)
    assert m1["loss"] == pytest.approx(m8["loss"], rel=1e-4, abs=1e-7)
    assert_params_equal(one, eight, exact=False, atol=STEP_ATOL)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_grad_accumulation_invariant_for_each_aggregation(assets, tmp_path, loss_agg):
    a, ma, _ = run_one_step(
        assets, tmp_path, "a", optim__micro_batch_size=8, optim__loss_agg=loss_agg, algorithm__name="grpo"
    )
    b, mb, _ = run_one_step(
        assets, tmp_path, "b", optim__micro_batch_size=2, optim__loss_agg=loss_agg, algorithm__name="grpo"
    )
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)
    assert_params_equal(a, b, exact=False, atol=STEP_ATOL)


def test_old_logprobs_do_not_depend_on_micro_batch(assets, tmp_path):
    cfg = load_config(make_config(assets, str(tmp_path / "x")))
    trainer = Trainer(cfg)
    ex = trainer.examples[:3]
    responses = trainer.rollout.generate([e.prompt_ids for e in ex], 2, seed=5)
    batch = build_batch([e.prompt_ids for e in ex for _ in range(2)], responses, trainer.tokenizer.pad_token_id)
    a = batched_logprobs(
        trainer.engine.module, batch, micro_batch_size=6, temperature=1.0, backend="torch", device="cpu"
    )
    b = batched_logprobs(
        trainer.engine.module, batch, micro_batch_size=1, temperature=1.0, backend="torch", device="cpu"
    )
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a[~batch.mask] == 0).all() and (a[batch.mask] < 0).all()
