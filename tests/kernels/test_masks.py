"""Masks of any dtype: every op that takes a mask accepts bool, integer and float 0/1 tensors
(TRL's ``completion_mask``, verl's ``response_mask``); nonzero counts, and the results equal the
bool mask's bit for bit, on every backend."""

from __future__ import annotations

import math

import pytest
import torch

import cepo_kernels as ck
from tests.kernels.helpers import backends, device_for

MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16, torch.float64]
IDS = [str(d).replace("torch.", "") for d in MASK_DTYPES]


def _case(device, b=3, t=7, v=50, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = False
    logits = [torch.randn(b, t, v, generator=g).to(device) for _ in range(3)]
    hidden = [torch.randn(b, t, d, generator=g).to(device) for _ in range(3)]
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(device)
    targets = torch.randint(0, v, (b, t), generator=g).to(device)
    adv = torch.randn(b, generator=g).to(device)
    return mask.to(device), logits, hidden, weight, targets, adv


def _as(mask, dtype):
    """The same mask in ``dtype``; integer and float masks use other nonzero values than 1 too."""
    if dtype == torch.bool:
        return mask
    m = mask.to(dtype)
    if dtype.is_floating_point:
        return m * torch.where(torch.arange(m.numel(), device=m.device).view(m.shape) % 2 == 0, 1.0, 0.5).to(dtype)
    return m * (1 + torch.arange(m.numel(), device=m.device).view(m.shape) % 3).to(dtype)


def _equal(a, b):
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=IDS)
def test_contrastive_logprobs_accepts_masks_of_any_dtype(backend, dtype):
    mask, logits, _, _, targets, adv = _case(device_for(backend))
    kw = dict(lam=0.5, eps_w=0.2, backend=backend)
    want = ck.contrastive_logprobs(*logits, targets, adv, mask=mask, **kw)
    _equal(ck.contrastive_logprobs(*logits, targets, adv, mask=_as(mask, dtype), **kw), want)
    assert bool((want.advantages[~mask] == 0).all())


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=IDS)
def test_linear_contrastive_logprobs_accepts_masks_of_any_dtype(backend, dtype):
    mask, _, hidden, weight, targets, adv = _case(device_for(backend))
    kw = dict(lam=0.5, eps_w=0.2, backend=backend)
    want = ck.linear_contrastive_logprobs(*hidden, weight, targets, adv, mask=mask, **kw)
    _equal(ck.linear_contrastive_logprobs(*hidden, weight, targets, adv, mask=_as(mask, dtype), **kw), want)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=IDS)
@pytest.mark.parametrize("per_token", [False, True], ids=["seqA", "tokA"])
def test_contrastive_advantage_accepts_masks_of_any_dtype(backend, dtype, per_token):
    mask, _, _, _, _, adv = _case(device_for(backend))
    g = torch.Generator().manual_seed(1)
    pos, neg = (-torch.rand(mask.shape, generator=g).to(mask.device) * 5 for _ in range(2))
    if per_token:
        adv = torch.randn(mask.shape, generator=g).to(mask.device)
    kw = dict(lam=0.7, eps_w=0.3, return_weights=True, backend=backend)
    want = ck.contrastive_advantage(adv, pos, neg, mask=mask, **kw)
    _equal(ck.contrastive_advantage(adv, pos, neg, mask=_as(mask, dtype), **kw), want)


def test_masks_reject_complex_and_non_tensors():
    mask, _, _, _, _, adv = _case("cpu")
    pos = neg = -torch.rand(mask.shape)
    with pytest.raises(ValueError, match="mask: expected a bool, integer or float"):
        ck.contrastive_advantage(adv, pos, neg, lam=0.5, eps_w=0.2, mask=mask.to(torch.complex64))
    with pytest.raises(ValueError, match="mask: expected a tensor"):
        ck.contrastive_advantage(adv, pos, neg, lam=0.5, eps_w=0.2, mask=mask.tolist())
