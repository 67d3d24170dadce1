"""contrastive_advantage: the formula against a float64 reference, backends agreeing, and
property tests of the weighting (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cepo_kernels as ck
from tests.kernels.helpers import assert_close, backends, device_for, reference_weighting64


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("per_token", [False, True], ids=["seqA", "tokA"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_contrastive_advantage_forward_matches_reference(backend, per_token, dtype):
    device = device_for(backend)
    g = torch.Generator().manual_seed(4 + per_token)
    b, t = 5, 37
    pos = (-torch.rand(b, t, generator=g) * 6).to(dtype)
    neg = (-torch.rand(b, t, generator=g) * 6).to(dtype)
    adv = torch.randn((b, t) if per_token else (b,), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    got, w = ck.contrastive_advantage(adv.to(device), pos.to(device), neg.to(device), lam=0.6, eps_w=0.25,
                                      mask=mask.to(device), return_weights=True, backend=backend)  # fmt: skip
    want, want_w = reference_weighting64(adv, pos, neg, 0.6, 0.25, mask)
    assert got.dtype == torch.float32
    assert_close(got, want, 1e-6, 1e-6, "advantages")
    assert_close(w, want_w, 1e-6, 1e-6, "weights")


@pytest.mark.parametrize("backend", backends())
def test_contrastive_advantage_rlsd_uses_policy_logprobs(backend):
    """RLSD: the policy's own log-probs in place of the r- teacher."""
    device = device_for(backend)
    pos = torch.tensor([[-0.1, -2.0, -0.5]], device=device)
    policy = torch.tensor([[-1.1, -1.0, -0.5]], device=device)
    adv = torch.tensor([-2.0], device=device)
    got = ck.contrastive_advantage(adv, pos, policy, lam=1.0, eps_w=0.5, backend=backend)
    # s = -1: w = exp(-(pos - policy)) = [e^-1, e^1, 1] -> clip [0.5, 1.5] -> [0.5, 1.5, 1]
    assert torch.allclose(got.cpu(), torch.tensor([[-1.0, -3.0, -2.0]]))


def test_contrastive_advantage_zero_advantage_and_float64():
    pos = torch.tensor([[-1.0, float("-inf")]], dtype=torch.float64)
    neg = torch.tensor([[-3.0, -1.0]], dtype=torch.float64)
    out = ck.contrastive_advantage(torch.tensor([0.0], dtype=torch.float64), pos, neg, lam=1.0, eps_w=0.2)
    assert out.dtype == torch.float64 and torch.equal(out, torch.zeros_like(out))


# finite advantages; fp32 subnormals are left out (A * c may underflow to 0 there)
finite_adv = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False).filter(
    lambda x: x == 0 or abs(x) > 1e-30
)
logprob = st.one_of(st.floats(min_value=-200.0, max_value=0.0, allow_nan=False), st.just(float("-inf")), st.just(0.0))


@st.composite
def weighting_case(draw):
    t = draw(st.integers(min_value=1, max_value=12))
    b = draw(st.integers(min_value=1, max_value=3))
    adv = torch.tensor(draw(st.lists(finite_adv, min_size=b, max_size=b)), dtype=torch.float32)
    pos = torch.tensor(draw(st.lists(logprob, min_size=b * t, max_size=b * t)), dtype=torch.float32).view(b, t)
    neg = torch.tensor(draw(st.lists(logprob, min_size=b * t, max_size=b * t)), dtype=torch.float32).view(b, t)
    lam = draw(st.floats(min_value=0.0, max_value=1.0))
    eps_w = draw(st.floats(min_value=0.0, max_value=0.99))
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).view(b, t)
    return adv, pos, neg, lam, eps_w, mask


@settings(max_examples=150, deadline=None)
@given(weighting_case())
def test_contrastive_advantage_properties(case):
    adv, pos, neg, lam, eps_w, mask = case
    out = ck.contrastive_advantage(adv, pos, neg, lam=lam, eps_w=eps_w, mask=mask)
    a = adv.unsqueeze(-1).expand_as(out)
    # finite A never gives NaN or inf
    assert torch.all(torch.isfinite(out))
    # masked tokens are 0; the sign of A is preserved elsewhere
    assert torch.all(out[~mask] == 0)
    assert torch.all(torch.sign(out[mask]) == torch.sign(a[mask]))
    # |A_t - A| <= lam * eps_w * |A|, up to the fp32 rounding of A_t (2 ulps of |A|)
    bound = (lam * eps_w + 2 * torch.finfo(torch.float32).eps) * a.double().abs()
    assert torch.all((out.double() - a.double()).abs()[mask] <= bound[mask])
    # lam = 0 returns A exactly; pos == neg returns A exactly
    assert torch.equal(ck.contrastive_advantage(adv, pos, neg, lam=0.0, eps_w=eps_w, mask=mask)[mask], a[mask])
    assert torch.equal(ck.contrastive_advantage(adv, pos, pos.clone(), lam=lam, eps_w=eps_w, mask=mask)[mask], a[mask])


@settings(max_examples=25, deadline=None)
@given(weighting_case())
def test_contrastive_advantage_backends_agree(case):
    adv, pos, neg, lam, eps_w, mask = case
    dev = device_for("triton")
    a = ck.contrastive_advantage(adv, pos, neg, lam=lam, eps_w=eps_w, mask=mask, backend="torch")
    b = ck.contrastive_advantage(
        adv.to(dev), pos.to(dev), neg.to(dev), lam=lam, eps_w=eps_w, mask=mask.to(dev), backend="triton"
    )
    torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=0)


def test_contrastive_advantage_rejects_bad_input():
    pos, neg, adv = -torch.rand(2, 3), -torch.rand(2, 3), torch.randn(2)
    with pytest.raises(ValueError, match="lam"):
        ck.contrastive_advantage(adv, pos, neg, lam=2.0, eps_w=0.1)
    with pytest.raises(ValueError, match="eps_w"):
        ck.contrastive_advantage(adv, pos, neg, lam=0.5, eps_w=math.inf)
    with pytest.raises(ValueError, match="neg_logprobs: expected shape"):
        ck.contrastive_advantage(adv, pos, neg[:, :2], lam=0.5, eps_w=0.1)
    with pytest.raises(ValueError, match="advantages: expected shape"):
        ck.contrastive_advantage(torch.randn(3), pos, neg, lam=0.5, eps_w=0.1)
    with pytest.raises(ValueError, match="backend"):
        ck.contrastive_advantage(adv, pos, neg, lam=0.5, eps_w=0.1, backend="numpy")
