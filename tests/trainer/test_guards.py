"""Trainer guards: non-finite gradients skip the optimizer step; the KL-to-reference term."""

from __future__ import annotations

import json
import math

import pytest
import torch

import cepo.train as train_mod
from cepo.config import load_config
from cepo.engine import skipped_steps
from cepo.train import Trainer
from tests.trainer.conftest import make_config, params


def changed(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


class Recording(Trainer):
    """A trainer that poisons the loss at the steps in ``poison`` and snapshots the weights around each step."""

    def __init__(self, cfg, poison: dict[int, float]):
        self.poison, self.current = poison, 0
        self.snapshots, self.lrs, self.skips_after, self.adam_states = {}, {}, {}, {}
        super().__init__(cfg)

    def step(self, k: int) -> dict:
        before = params(self.engine.module)
        self.current = k
        m = super().step(k)
        self.snapshots[k] = (before, params(self.engine.module))
        self.lrs[k] = self.engine.get_lr()[0]
        self.skips_after[k] = skipped_steps(self.engine, self.optimizer)
        self.adam_states[k] = len(self.optimizer.state)
        return m


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_gradients_skip_the_step_and_are_counted(assets, tmp_path, monkeypatch, bad):
    real_loss = train_mod.ppo_loss
    holder: dict = {}

    def poisoned_loss(*a, **k):
        loss, stats = real_loss(*a, **k)
        trainer = holder["trainer"]
        if trainer.current in trainer.poison:
            loss = loss * trainer.poison[trainer.current]  # NaN (or inf / NaN) in every gradient
        return loss, stats

    monkeypatch.setattr(train_mod, "ppo_loss", poisoned_loss)
    cfg = load_config(make_config(assets, str(tmp_path / "run"), steps=2, optim__warmup_steps=2))
    trainer = Recording(cfg, poison={1: bad})
    holder["trainer"] = trainer
    lr0 = trainer.engine.get_lr()[0]
    trainer.fit()

    # Step 1: gradients are non-finite; the weights, the Adam state and the LR schedule do not move.
    before, after = trainer.snapshots[1]
    assert not changed(before, after)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert trainer.skips_after[1] == 1
    assert trainer.adam_states[1] == 0  # AdamW.step never ran: no moments, no step count
    assert trainer.lrs[1] == pytest.approx(lr0)  # warm-up did not advance on the skipped step
    # Step 2: a normal step updates the weights and is not counted as skipped.
    before, after = trainer.snapshots[2]
    assert before.keys() == after.keys()
    assert changed(before, after)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert trainer.skips_after[2] == 1
    assert trainer.lrs[2] > lr0  # the scheduler stepped this time (warm-up 1/2 -> 2/2)
    assert trainer.adam_states[2] > 0  # Adam has state from the applied step

    records = [json.loads(line) for line in open(trainer.metrics.path)]
    by_step = {r["step"]: r for r in records if r["step"] > 0}
    assert by_step[1]["skipped_steps"] == 1
    assert by_step[2]["skipped_steps"] == 1
    assert not math.isfinite(by_step[1]["grad_norm"])
    assert math.isfinite(by_step[2]["grad_norm"]) and by_step[2]["grad_norm"] > 0


def test_kl_to_reference_is_zero_at_start_and_reference_stays_frozen(assets, tmp_path):
    cfg = load_config(make_config(assets, str(tmp_path / "kl"), steps=2, optim__kl_coef=0.5))
    trainer = Trainer(cfg)
    assert trainer.ref_model is not None
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    policy_ptrs = {p.data_ptr() for p in trainer.engine.module.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in trainer.ref_model.parameters()}  # no shared storage
    ref0 = params(trainer.ref_model)
    policy0 = params(trainer.engine.module)
    assert not changed(ref0, policy0)  # the reference starts as the policy

    m1 = trainer.step(1)
    assert "time/logprob_ref" in m1
    assert math.isfinite(m1["kl"]) and 0.0 <= m1["kl"] < 1e-8  # policy == reference before the update
    policy1 = params(trainer.engine.module)
    assert changed(policy0, policy1)  # the policy moved
    assert not changed(ref0, params(trainer.ref_model))  # the reference did not

    m2 = trainer.step(2)
    assert math.isfinite(m2["kl"]) and m2["kl"] > 1e-8  # the policy now differs from the reference
    assert not changed(ref0, params(trainer.ref_model))
    assert changed(policy1, params(trainer.engine.module))


def test_kl_gradient_vanishes_when_policy_equals_reference(assets, tmp_path):
    """k3's gradient is 0 at logp == ref_logp: the first step with kl_coef > 0 equals one without."""
    with_kl = Trainer(load_config(make_config(assets, str(tmp_path / "a"), optim__kl_coef=0.5)))
    m_kl = with_kl.step(1)
    without = Trainer(load_config(make_config(assets, str(tmp_path / "b"))))
    assert without.ref_model is None
    m0 = without.step(1)
    assert m0["kl"] == 0.0 and m_kl["kl"] < 1e-8
    assert m_kl["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-5)
    a, b = params(with_kl.engine.module), params(without.engine.module)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
