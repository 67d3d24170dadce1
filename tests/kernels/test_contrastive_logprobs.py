"""contrastive_logprobs against float64 log_softmax + the weighting formula, every backend."""

import pytest
import torch

import cepo_kernels as ck
from tests.kernels.helpers import (
    DTYPE_IDS,
    DTYPES,
    LOGP_ATOL,
    LOGP_RTOL,
    assert_close,
    backends,
    device_for,
    random_logits,
    reference_logprobs64,
    reference_weighting64,
)


def make_case(b, t, vocab, dtype, device, seed, per_token=False, with_mask=True):
    g = torch.Generator().manual_seed(seed)
    streams = [random_logits((b, t, vocab), dtype, device, generator=g) for _ in range(3)]
    targets = torch.randint(0, vocab, (b, t), generator=g)
    adv = torch.randn((b, t) if per_token else (b,), generator=g) * 2
    mask = None
    if with_mask:
        mask = torch.rand(b, t, generator=g) > 0.2
        targets = torch.where(mask, targets, torch.full_like(targets, 10**6))  # garbage under the mask is fine
        mask = mask.to(device)
    return streams, targets.to(device), adv.to(device), mask


def reference(streams, targets, adv, mask, lam, eps_w, temperature):
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask
    t = torch.where(keep, targets, torch.full_like(targets, -100))
    lps = [reference_logprobs64(s, t, temperature)[0] for s in streams]
    adv64, w64 = reference_weighting64(adv, lps[1], lps[2], lam, eps_w, keep)
    return lps, adv64, w64


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("per_token", [False, True], ids=["seqA", "tokA"])
def test_contrastive_logprobs_forward_matches_reference(backend, dtype, vocab, per_token):
    device = device_for(backend)
    b, t = (2, 3) if vocab < 32003 else (1, 3)
    streams, targets, adv, mask = make_case(b, t, vocab, dtype, device, seed=vocab + per_token, per_token=per_token)
    # small temperature widens the log-prob gaps so weights hit both clip bounds
    out = ck.contrastive_logprobs(
        *streams, targets, adv, lam=0.7, eps_w=0.3, temperature=0.5, mask=mask, backend=backend
    )
    lps, adv64, w64 = reference(streams, targets, adv, mask, 0.7, 0.3, 0.5)
    for got, want, name in zip(out[:3], lps, ["policy", "pos", "neg"]):
        assert got.dtype == torch.float32 and got.shape == (b, t)
        assert_close(got, want, LOGP_ATOL, LOGP_RTOL, name)
    assert_close(out.weights, w64, 1e-5, 1e-5, "weights")
    assert_close(out.advantages, adv64, 1e-5, 1e-5, "advantages")
    assert torch.all(out.advantages[~mask] == 0) and torch.all(out.weights[~mask] == 1)
    assert torch.all(out.pos[~mask] == 0)


@pytest.mark.parametrize("backend", backends())
def test_contrastive_logprobs_equals_separate_ops(backend):
    """One pass gives what three token_logprobs calls and contrastive_advantage give."""
    device = device_for(backend)
    streams, targets, adv, _ = make_case(3, 4, 333, torch.bfloat16, device, seed=5, with_mask=False)
    out = ck.contrastive_logprobs(*streams, targets, adv, lam=0.4, eps_w=0.2, temperature=1.2, backend=backend)
    singles = [ck.token_logprobs(s, targets, temperature=1.2, backend=backend) for s in streams]
    for got, want in zip(out[:3], singles):
        assert torch.equal(got, want)
    adv_sep, w_sep = ck.contrastive_advantage(
        adv, singles[1], singles[2], lam=0.4, eps_w=0.2, return_weights=True, backend=backend
    )
    assert_close(out.advantages, adv_sep, 0, 0, "advantages")
    assert_close(out.weights, w_sep, 0, 0, "weights")


@pytest.mark.parametrize("backend", backends())
def test_contrastive_logprobs_without_policy(backend):
    device = device_for(backend)
    streams, targets, adv, mask = make_case(2, 5, 64, torch.float32, device, seed=8)
    out = ck.contrastive_logprobs(
        None, streams[1], streams[2], targets, adv, lam=1.0, eps_w=0.5, mask=mask, backend=backend
    )
    full = ck.contrastive_logprobs(*streams, targets, adv, lam=1.0, eps_w=0.5, mask=mask, backend=backend)
    assert out.policy is None
    assert torch.equal(out.pos, full.pos) and torch.equal(out.advantages, full.advantages)


@pytest.mark.parametrize("backend", backends())
def test_contrastive_logprobs_extreme_gaps_and_neg_inf(backend):
    """Huge log-prob gaps clip the weight; a -inf target logit in one teacher gives a clipped
    weight; in both teachers the weight is 1. Advantages stay finite."""
    device = device_for(backend)
    vocab = 40
    pos = torch.full((1, 4, vocab), -30.0)
    neg = torch.full((1, 4, vocab), -30.0)
    targets = torch.tensor([[0, 1, 2, 3]])
    pos[0, 0, 0] = 30.0  # teacher+ sure, teacher- not: delta ~ +60
    neg[0, 1, 1] = 30.0  # delta ~ -60
    pos[0, 2, 2] = float("-inf")  # delta = -inf
    pos[0, 3, 3] = float("-inf")
    neg[0, 3, 3] = float("-inf")  # -inf - -inf: undefined -> weight 1
    adv = torch.tensor([1.5])
    out = ck.contrastive_logprobs(None, pos.to(device), neg.to(device), targets.to(device), adv.to(device),
                                  lam=1.0, eps_w=0.2, backend=backend)  # fmt: skip
    w = out.weights.cpu()[0]
    assert torch.allclose(w, torch.tensor([1.2, 0.8, 0.8, 1.0]))
    assert torch.all(torch.isfinite(out.advantages))
    assert torch.allclose(out.advantages.cpu()[0], 1.5 * w)


@pytest.mark.parametrize("backend", backends())
def test_contrastive_logprobs_sign_from_masked_sum_of_token_advantages(backend):
    device = device_for(backend)
    streams, targets, _, _ = make_case(1, 3, 20, torch.float32, device, seed=1, with_mask=False)
    adv = torch.tensor([[1.0, 1.0, -5.0]], device=device)
    mask = torch.tensor([[True, True, False]], device=device)  # masked sum is +2 -> sign +1
    out = ck.contrastive_logprobs(
        *streams, targets, adv, lam=1.0, eps_w=0.9, temperature=0.3, mask=mask, backend=backend
    )
    lps, adv64, w64 = reference(streams, targets, adv, mask, 1.0, 0.9, 0.3)
    assert_close(out.weights, w64, 1e-5, 1e-5, "weights")
    d = (out.pos - out.neg)[0, :2]
    assert torch.allclose(out.weights[0, :2], torch.exp(d).clamp(0.1, 1.9), rtol=1e-5)


def test_contrastive_logprobs_real_vocabulary_torch():
    streams, targets, adv, mask = make_case(1, 3, 151936, torch.bfloat16, "cpu", seed=3)
    out = ck.contrastive_logprobs(*streams, targets, adv, lam=0.5, eps_w=0.2, mask=mask, backend="torch")
    lps, adv64, w64 = reference(streams, targets, adv, mask, 0.5, 0.2, 1.0)
    assert_close(out.neg, lps[2], LOGP_ATOL, LOGP_RTOL, "neg")
    assert_close(out.advantages, adv64, 1e-5, 1e-5, "advantages")


def _ok():
    streams, targets, adv, mask = make_case(2, 3, 11, torch.float32, "cpu", seed=0)
    return dict(policy_logits=streams[0], pos_logits=streams[1], neg_logits=streams[2], targets=targets,
                advantages=adv, lam=0.5, eps_w=0.2, mask=mask)  # fmt: skip


BAD = {
    "lam_high": ({"lam": 1.5}, "lam: expected"),
    "lam_negative": ({"lam": -0.1}, "lam: expected"),
    "eps_one": ({"eps_w": 1.0}, "eps_w: expected"),
    "eps_negative": ({"eps_w": -0.2}, "eps_w: expected"),
    "adv_shape": ({"advantages": torch.randn(3)}, "advantages: expected shape"),
    "neg_shape": ({"neg_logits": torch.randn(2, 3, 12)}, "neg_logits: expected shape"),
    "mask_dtype": ({"mask": torch.ones(2, 3, dtype=torch.complex64)}, "mask: expected a bool, integer or float"),
    "mask_type": ({"mask": [[1, 1, 1], [1, 1, 0]]}, "mask: expected a tensor"),
    "mask_shape": ({"mask": torch.ones(2, 4, dtype=torch.bool)}, "mask: expected shape"),
    "int_logits": ({"pos_logits": torch.ones(2, 3, 11, dtype=torch.int32)}, "pos_logits: expected a float"),
    "targets_float": ({"targets": torch.zeros(2, 3)}, "targets: expected an integer"),
    "target_out_of_range": ({"targets": torch.full((2, 3), 11), "mask": None}, "found 11"),
    "temperature": ({"temperature": -1.0}, "temperature"),
    "backend": ({"backend": "cuda"}, "cuda: tensors"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_contrastive_logprobs_rejects_bad_input(case):
    change, message = BAD[case]
    kwargs = {**_ok(), **change}
    args = [kwargs.pop(k) for k in ("policy_logits", "pos_logits", "neg_logits", "targets", "advantages")]
    with pytest.raises(ValueError, match=message):
        ck.contrastive_logprobs(*args, **kwargs)
