"""No host syncs on the hot path: ``validate=`` (on by default for CPU tensors only) and the
device-side handling of bad targets without it; ``torch.compile(fullgraph=True)`` of a function
calling every public op (CPU, torch backend, forward and backward)."""

from __future__ import annotations

import math

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels.tree_attention import tree_layout


def _inputs(seed=0, b=2, t=5, v=37, d=8):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(b, t, v, generator=g) for _ in range(3)]
    hidden = [torch.randn(b, t, d, generator=g) for _ in range(3)]
    weight = torch.randn(v, d, generator=g) / math.sqrt(d)
    targets = torch.randint(0, v, (b, t), generator=g)
    return logits, hidden, weight, targets, torch.randn(b, generator=g)


def test_validate_defaults_to_on_for_cpu_and_can_be_turned_off():
    logits, hidden, weight, targets, adv = _inputs()
    bad = targets.clone()
    bad[0, 2] = 37  # out of range
    bad[1, 0] = -5
    with pytest.raises(ValueError, match="found"):
        ck.token_logprobs(logits[0], bad)
    with pytest.raises(ValueError, match="found"):
        ck.linear_token_logprobs(hidden[0], weight, bad, validate=True)
    ignored = torch.where((bad < 0) | (bad >= 37), -100, bad)
    is_bad = ignored != bad
    for fn, x in ((ck.token_logprobs, (logits[0],)), (ck.linear_token_logprobs, (hidden[0], weight))):
        lp, ent = fn(*x, bad, return_entropy=True, validate=False)
        want_lp, want_ent = fn(*x, ignored, return_entropy=True)
        assert bool(lp[is_bad].isnan().all()) and bool(ent[is_bad].isnan().all())
        assert torch.equal(lp[~is_bad], want_lp[~is_bad]) and torch.equal(ent[~is_bad], want_ent[~is_bad])


def test_validate_off_gives_zero_gradient_at_bad_targets():
    logits, hidden, weight, targets, _ = _inputs(1)
    bad = targets.clone()
    bad[0, 1] = 1000
    x = logits[0].clone().requires_grad_()
    lp = ck.token_logprobs(x, bad, validate=False)
    torch.where(lp.isnan(), 0, lp).sum().backward()
    assert bool((x.grad[0, 1] == 0).all()) and bool(x.grad[0, 0].abs().sum() > 0)
    h = hidden[0].clone().requires_grad_()
    lp = ck.linear_token_logprobs(h, weight, bad, validate=False)
    torch.where(lp.isnan(), 0, lp).sum().backward()
    assert bool((h.grad[0, 1] == 0).all()) and bool(torch.isfinite(h.grad).all())


@pytest.mark.parametrize("op", ["contrastive_logprobs", "linear_contrastive_logprobs"])
def test_contrastive_validate_off_marks_bad_targets(op):
    logits, hidden, weight, targets, adv = _inputs(2)
    mask = torch.ones_like(targets, dtype=torch.bool)
    bad = targets.clone()
    bad[1, 3] = 99
    streams = logits if op == "contrastive_logprobs" else [*hidden, weight]
    fn = getattr(ck, op)
    with pytest.raises(ValueError, match="found 99"):
        fn(*streams, bad, adv, lam=0.5, eps_w=0.2, mask=mask)
    out = fn(*streams, bad, adv, lam=0.5, eps_w=0.2, mask=mask, validate=False)
    mask2 = mask.clone()
    mask2[1, 3] = False
    want = fn(*streams, targets, adv, lam=0.5, eps_w=0.2, mask=mask2)
    for name, got, exp in zip(out._fields, out, want):
        if name in ("policy", "pos", "neg"):
            assert bool(got[1, 3].isnan())
            got, exp = got[mask2], exp[mask2]
        assert torch.equal(got, exp), name
    # a bad target where the mask does not count is not an error at all
    fn(*streams, bad, adv, lam=0.5, eps_w=0.2, mask=mask2)


def test_public_ops_compile_with_fullgraph():
    """Every public op inside one ``torch.compile(fullgraph=True)`` function (no graph break, no
    host sync), forward and backward, equal to eager."""
    logits, hidden, weight, targets, adv = _inputs(3)
    mask = (torch.arange(5) < 4).expand(2, 5).float()  # a float mask, as TRL passes it
    layout = tree_layout(torch.tensor([[0, 3, 7]]), torch.tensor([[3, 4, 1]]), torch.tensor([[-1, 0, 0]]), 9)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 9, 8, generator=g)
    k, v = torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    leaves = [t.clone().requires_grad_() for t in (logits[0], hidden[0], weight, q, k, v)]

    def step(x, h, w, q_, k_, v_):
        lp, ent = ck.token_logprobs(x, targets, return_entropy=True)
        lin = ck.linear_token_logprobs(h, w, targets, temperature=0.9)
        con = ck.contrastive_logprobs(x.detach(), logits[1], logits[2], targets, adv, lam=0.5, eps_w=0.2, mask=mask)
        lcon = ck.linear_contrastive_logprobs(*hidden, w.detach(), targets, adv, lam=0.5, eps_w=0.2, mask=mask)
        a_t = ck.contrastive_advantage(adv, con.pos, con.neg, lam=0.5, eps_w=0.2, mask=mask)
        grp = ck.group_advantages(adv.repeat(2), group_size=2)
        o, lse = ck.tree_attention(q_, k_, v_, layout)
        o2, _ = ck.tree_attention(q_, k_, v_, layout, need_lse=False)
        lse0 = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        loss = (lp * a_t).sum() + ent.sum() + lin.sum() + o.sum() + lse0.sum() + (o2 * o2).sum()
        return loss, lcon.advantages.sum() + grp.sum() + con.weights.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got[0], leaves)
    want = step(*leaves)
    want_grads = torch.autograd.grad(want[0], leaves)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
