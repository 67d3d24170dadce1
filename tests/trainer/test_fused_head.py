"""The padded passes' fused LM head (log-probs from hidden states through ``linear_token_logprobs``,
used wherever the head is a plain ``nn.Linear``) gives what the logits path gives, in the forward,
the gradients and a whole training step."""

from __future__ import annotations

import pytest
import torch

import cepo_kernels
from cepo.config import load_config
from cepo.scoring import build_batch, forward_logprobs, fused_head_unavailable, packing_unavailable
from cepo.train import Trainer
from tests.trainer.conftest import make_config
from tests.trainer.test_invariants import STEP_ATOL, assert_params_equal, run_one_step


def _no_logits(*args, **kwargs):
    raise AssertionError("the logits path ran although the fused head is on")


@pytest.fixture(scope="module")
def trainer_and_batch(assets, tmp_path_factory):
    cfg = load_config(make_config(assets, str(tmp_path_factory.mktemp("fused"))))
    trainer = Trainer(cfg)
    ex = trainer.examples[:3]
    responses = trainer.rollout.generate([e.prompt_ids for e in ex], 2, seed=3).tokens
    batch = build_batch([e.prompt_ids for e in ex for _ in range(2)], responses, trainer.tokenizer.pad_token_id)
    return trainer, batch


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_matches_logits_path_forward_and_backward(trainer_and_batch, temperature, monkeypatch):
    trainer, batch = trainer_and_batch
    model = trainer.engine.module
    outs, grads = [], []
    for fused in (False, True):
        if fused:  # the fused path must not make logits
            monkeypatch.setattr(cepo_kernels, "token_logprobs", _no_logits)
        model.zero_grad(set_to_none=True)
        logp, entropy = forward_logprobs(
            model, batch, temperature=temperature, backend="torch", return_entropy=True, fused_head=fused
        )
        weights = torch.linspace(-1.0, 2.0, logp.numel()).view_as(logp)  # non-uniform upstream gradient
        ((logp * weights).sum() + 0.1 * entropy.sum()).backward()
        outs.append((logp.detach(), entropy.detach()))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=2e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=2e-5)
    assert (outs[1][0][~batch.mask] == 0).all() and (outs[1][0][batch.mask] < 0).all()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)
    model.zero_grad(set_to_none=True)


class LogitsPathTrainer(Trainer):
    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.experience.passes.fused_head = False


def test_fused_head_training_step_matches(assets, tmp_path, monkeypatch):
    kw = dict(algorithm__name="cepo", scoring__packing="false")  # the padded passes (packed ones always fuse)
    plain, m_plain, t_plain = run_one_step(assets, tmp_path, "plain", LogitsPathTrainer, **kw)
    assert not t_plain.experience.passes.fused_head
    monkeypatch.setattr(cepo_kernels, "token_logprobs", _no_logits)
    fused, m_fused, t_fused = run_one_step(assets, tmp_path, "fused", **kw)
    assert t_fused.experience.passes.fused_head  # the padded default for a plain nn.Linear head
    assert m_fused["grad_norm"] == pytest.approx(m_plain["grad_norm"], rel=1e-4)
    assert m_fused["reward"] == m_plain["reward"]  # same rollouts
    assert_params_equal(plain, fused, exact=False, atol=STEP_ATOL)


def test_cuda_backend_keeps_the_logits_path(trainer_and_batch, assets, tmp_path):
    trainer, _ = trainer_and_batch
    model = trainer.engine.module
    assert fused_head_unavailable(trainer.cfg, model) is None
    cfg = load_config(make_config(assets, str(tmp_path / "c"), scoring__kernel_backend="cuda"))
    assert "logits ops only" in fused_head_unavailable(cfg, model)
    assert "logits ops only" in packing_unavailable(cfg, model)  # auto: padded, through the logits
