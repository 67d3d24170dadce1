"""No host syncs on the hot path: ``validate=`` (on by default for CPU tensors only) and the
device-side handling of bad targets without it. (``torch.compile(fullgraph=True)`` of every
public op, each as the first call of a fresh process: ``test_torch_compile.py``.)"""

from __future__ import annotations

import pytest
import torch

import cepo_kernels as ck
from tests.kernels.compile_cases import inputs as _inputs


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
