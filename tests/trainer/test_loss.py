"""``cepo.loss``: the PPO-clipped loss against an element-by-element reference, the KL term, TIS weights."""

from __future__ import annotations

import math

import pytest
import torch

from cepo.loss import ppo_loss, tis_weights


def _loss_reference(logp, old, adv, mask, cl, ch, dual):
    """float64 per-token PPO loss written out element by element."""
    out = torch.zeros_like(logp, dtype=torch.float64)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            r = math.exp(float(logp[i, t]) - float(old[i, t]))
            a = float(adv[i, t])
            v = max(-a * r, -a * min(max(r, 1 - cl), 1 + ch))
            if dual is not None and a < 0:
                v = min(v, -a * dual)
            out[i, t] = v
    return out


@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_ppo_loss_matches_reference(dual, agg):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.8
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[:, 0] = True
    ref = _loss_reference(logp, old, adv, mask, 0.2, 0.28, dual)
    if agg == "token_mean":
        expected = ref.sum() / mask.sum()
        norm = float(mask.sum())
    else:
        expected = (ref.sum(-1) / mask.sum(-1)).sum() / 3
        norm = 3.0
    loss, stats = ppo_loss(logp, old, adv, mask, normalizer=norm, dual_clip=dual, loss_agg=agg)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert stats["tokens"].item() == mask.sum().item()


def test_ppo_loss_gradient_is_minus_advantage_at_ratio_one():
    logp = -torch.rand(2, 3, dtype=torch.float64) - 0.1
    logp.requires_grad_(True)
    adv = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, _ = ppo_loss(logp, logp.detach(), adv, mask, normalizer=6.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 6.0)


def test_kl_term_is_zero_at_the_reference_and_positive_elsewhere():
    logp = -torch.rand(2, 4, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    zero = torch.zeros(2, 4, dtype=torch.float64)
    _, s = ppo_loss(logp, logp, zero, mask, normalizer=8.0, ref_logp=logp.clone(), kl_coef=0.1)
    assert s["kl"].item() == 0.0
    _, s = ppo_loss(logp, logp, zero, mask, normalizer=8.0, ref_logp=logp - 0.3, kl_coef=0.1)
    assert s["kl"].item() > 0


def test_tis_weights_are_truncated_ratios_and_one_at_padding():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.0]])
    sampler = torch.tensor([[-1.0, -1.0, -2.5], [-0.1, -0.1, -1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w = tis_weights(old, sampler, mask, cap=2.0)
    expected = torch.tensor([[1.0, math.exp(-1.0), 2.0], [1.0, math.exp(-2.9), 1.0]])
    torch.testing.assert_close(w, expected)
