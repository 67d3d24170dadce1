"""linear_contrastive_logprobs (three contexts and the CEPO weighting from hidden states and the
LM-head weight) against float64 logits + the weighting formula, and against the single-stream
op and the logits op."""

import math

import pytest
import torch

from cepo_kernels.contrastive_logprobs import contrastive_logprobs
from cepo_kernels.linear_contrastive_logprobs import linear_contrastive_logprobs
from cepo_kernels.linear_token_logprobs import linear_token_logprobs
from tests.kernels.helpers import DTYPE_IDS, backends, device_for, reference_logprobs64, reference_weighting64

LOGP_ATOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3}


def make_case(b, t, d, v, dtype, device, seed, *, per_token=False, with_mask=True, with_bias=False):
    """Three hidden streams that share a head; logits of standard deviation about 3."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, t, d, generator=g)
    # related contexts, as in CEPO: the teacher contexts move the hidden states a little
    streams = [base + 0.5 * torch.randn(b, t, d, generator=g) for _ in range(3)]
    weight = torch.randn(v, d, generator=g) * (3.0 / math.sqrt(d))
    bias = torch.randn(v, generator=g) if with_bias else None
    targets = torch.randint(0, v, (b, t), generator=g)
    adv = torch.randn((b, t) if per_token else (b,), generator=g) * 2
    mask = None
    if with_mask:
        mask = torch.rand(b, t, generator=g) > 0.25
        mask[0, 0] = True
        mask[0, 1] = False
        targets = torch.where(mask, targets, torch.full_like(targets, 10**6))  # garbage under the mask is fine
        mask = mask.to(device)
    to = lambda x: None if x is None else x.to(dtype).to(device)  # noqa: E731
    return [to(s) for s in streams], to(weight), to(bias), targets.to(device), adv.to(device), mask


def reference(streams, weight, bias, targets, adv, mask, lam, eps_w, temperature):
    """float64 log-probs of each stream through full logits, and the weighting."""
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask
    t = torch.where(keep, targets, torch.full_like(targets, -100))
    lps = []
    for h in streams:
        z = h.double() @ weight.double().T + (0 if bias is None else bias.double())
        lps.append(reference_logprobs64(z, t, temperature)[0])
    adv64, w64 = reference_weighting64(adv, lps[1], lps[2], lam, eps_w, keep)
    return lps, adv64, w64


def assert_logp_close(got, want, dtype, what):
    err = (got.double().cpu() - want.double().cpu()).abs().max().item()
    assert err <= LOGP_ATOL[dtype], f"{what}: max abs error {err:.3g} > {LOGP_ATOL[dtype]}"


def assert_weighting_close(out, adv64, w64, what=""):
    torch.testing.assert_close(out.weights.double().cpu(), w64.cpu(), atol=1e-4, rtol=1e-4, msg=f"weights {what}")
    torch.testing.assert_close(out.advantages.double().cpu(), adv64.cpu(), atol=1e-4, rtol=1e-4, msg=f"adv {what}")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("per_token", [False, True], ids=["seqA", "tokA"])
def test_linear_contrastive_logprobs_forward_matches_reference(backend, dtype, per_token):
    device = device_for(backend)
    b, t, d, v = 2, 4, 123, 1000
    streams, weight, bias, targets, adv, mask = make_case(
        b, t, d, v, dtype, device, seed=3 + per_token, per_token=per_token, with_bias=per_token
    )
    # a small temperature widens the log-prob gaps so the weights hit both clip bounds
    out = linear_contrastive_logprobs(
        *streams, weight, targets, adv, lam=0.7, eps_w=0.3, temperature=0.5, mask=mask, bias=bias, backend=backend
    )
    lps, adv64, w64 = reference(streams, weight, bias, targets, adv, mask, 0.7, 0.3, 0.5)
    for got, want, name in zip(out[:3], lps, ["policy", "pos", "neg"]):
        assert got.dtype == torch.float32 and got.shape == (b, t)
        assert_logp_close(got, want, dtype, name)
    assert_weighting_close(out, adv64, w64)
    assert torch.all(out.advantages[~mask] == 0) and torch.all(out.weights[~mask] == 1)
    for x in out[:3]:
        assert torch.all(x[~mask] == 0)
    clipped = out.weights[mask]
    assert bool((clipped == 1.3).any() or (clipped == 0.7).any()), "no weight reached a clip bound"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("with_policy", [True, False], ids=["policy", "no_policy"])
def test_linear_contrastive_logprobs_equals_three_single_calls(backend, with_policy):
    """Each stream's log-probs are bit-identical to ``linear_token_logprobs`` on that stream."""
    device = device_for(backend)
    streams, weight, bias, targets, adv, mask = make_case(1, 7, 64, 700, torch.bfloat16, device, seed=5, with_bias=True)
    policy = streams[0] if with_policy else None
    out = linear_contrastive_logprobs(
        policy, streams[1], streams[2], weight, targets, adv, lam=1.0, eps_w=0.2, temperature=1.2, mask=mask,
        bias=bias, backend=backend,
    )  # fmt: skip
    masked_targets = torch.where(mask, targets, torch.full_like(targets, -100))
    singles = [
        linear_token_logprobs(h, weight, masked_targets, temperature=1.2, bias=bias, backend=backend) for h in streams
    ]
    if with_policy:
        assert torch.equal(out.policy, singles[0])
    else:
        assert out.policy is None
    assert torch.equal(out.pos, singles[1]) and torch.equal(out.neg, singles[2])


@pytest.mark.parametrize("backend", backends())
def test_linear_contrastive_logprobs_equals_logits_op(backend):
    """The same result as ``contrastive_logprobs`` on the three logits tensors (fp32 logits)."""
    device = device_for(backend)
    streams, weight, bias, targets, adv, mask = make_case(
        2, 3, 48, 500, torch.float32, device, seed=8, per_token=True, with_bias=True
    )
    out = linear_contrastive_logprobs(
        *streams, weight, targets, adv, lam=0.5, eps_w=0.2, mask=mask, bias=bias, backend=backend
    )
    logits = [(h.double() @ weight.double().T + bias.double()).float() for h in streams]
    want = contrastive_logprobs(*logits, targets, adv, lam=0.5, eps_w=0.2, mask=mask, backend="torch")
    for got, exp, name in zip(out, want, want._fields):
        torch.testing.assert_close(got, exp, atol=2e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", backends())
def test_linear_contrastive_logprobs_batch_invariant(backend):
    """A sequence's results do not depend on which other sequences share the batch."""
    device = device_for(backend)
    streams, weight, _, targets, adv, mask = make_case(3, 5, 40, 300, torch.bfloat16, device, seed=13)
    full = linear_contrastive_logprobs(*streams, weight, targets, adv, lam=0.6, eps_w=0.25, mask=mask, backend=backend)
    again = linear_contrastive_logprobs(*streams, weight, targets, adv, lam=0.6, eps_w=0.25, mask=mask, backend=backend)
    for x, y in zip(full, again):
        assert torch.equal(x, y)
    for lo, hi in [(0, 1), (1, 2), (1, 3)]:
        part = linear_contrastive_logprobs(
            *(s[lo:hi] for s in streams), weight, targets[lo:hi], adv[lo:hi],
            lam=0.6, eps_w=0.25, mask=mask[lo:hi], backend=backend,
        )  # fmt: skip
        for x, y, name in zip(part, full, full._fields):
            assert torch.equal(x, y[lo:hi]), f"{name} of sequences {lo}:{hi} changed with the batch"


def test_linear_contrastive_logprobs_real_vocabulary_torch():
    streams, weight, _, targets, adv, mask = make_case(1, 3, 16, 151936, torch.bfloat16, "cpu", seed=3)
    out = linear_contrastive_logprobs(*streams, weight, targets, adv, lam=0.5, eps_w=0.2, mask=mask, backend="torch")
    lps, adv64, w64 = reference(streams, weight, None, targets, adv, mask, 0.5, 0.2, 1.0)
    for got, want, name in zip(out[:3], lps, ["policy", "pos", "neg"]):
        assert_logp_close(got, want, torch.bfloat16, name)
    assert_weighting_close(out, adv64, w64)


def test_linear_contrastive_logprobs_float64_torch():
    streams, weight, bias, targets, adv, mask = make_case(2, 3, 20, 100, torch.float64, "cpu", seed=4, with_bias=True)
    out = linear_contrastive_logprobs(
        *streams, weight, targets, adv, lam=0.5, eps_w=0.2, mask=mask, bias=bias, backend="torch"
    )
    lps, adv64, w64 = reference(streams, weight, bias, targets, adv, mask, 0.5, 0.2, 1.0)
    assert out.pos.dtype == torch.float64
    for got, want in zip(out[:3], lps):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.advantages, adv64, atol=1e-12, rtol=1e-12)


def _ok():
    streams, weight, _, targets, adv, mask = make_case(2, 3, 8, 11, torch.float32, "cpu", seed=0)
    return dict(policy_hidden=streams[0], pos_hidden=streams[1], neg_hidden=streams[2], weight=weight,
                targets=targets, advantages=adv, lam=0.5, eps_w=0.2, mask=mask)  # fmt: skip


BAD = {
    "lam_high": ({"lam": 1.5}, "lam: expected"),
    "lam_negative": ({"lam": -0.1}, "lam: expected"),
    "eps_one": ({"eps_w": 1.0}, "eps_w: expected"),
    "eps_negative": ({"eps_w": -0.2}, "eps_w: expected"),
    "temperature": ({"temperature": 0.0}, "temperature"),
    "adv_shape": ({"advantages": torch.randn(3)}, "advantages: expected shape"),
    "mask_dtype": ({"mask": torch.ones(2, 3, dtype=torch.complex64)}, "mask: expected a bool, integer or float"),
    "mask_type": ({"mask": [[1, 1, 1], [1, 1, 0]]}, "mask: expected a tensor"),
    "neg_shape": ({"neg_hidden": torch.randn(2, 4, 8)}, "neg_hidden: expected shape"),
    "d_mismatch": ({"weight": torch.randn(11, 9)}, r"weight: expected shape \(V, 8\)"),
    "weight_dtype": ({"weight": torch.randn(11, 8).bfloat16()}, "expected the same dtype as weight"),
    "int_hidden": ({"pos_hidden": torch.ones(2, 3, 8, dtype=torch.int32)}, "pos_hidden: expected a float"),
    "targets_float": ({"targets": torch.zeros(2, 3)}, "targets: expected an integer"),
    "target_out_of_range": ({"targets": torch.full((2, 3), 11), "mask": None}, "found 11"),
    "bias_shape": ({"bias": torch.randn(12)}, "bias: expected shape"),
    "backend": ({"backend": "cuda"}, "no 'cuda' implementation"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_linear_contrastive_logprobs_rejects_bad_input(case):
    change, message = BAD[case]
    kwargs = {**_ok(), **change}
    args = [kwargs.pop(k) for k in ("policy_hidden", "pos_hidden", "neg_hidden", "weight", "targets", "advantages")]
    with pytest.raises(ValueError, match=message):
        linear_contrastive_logprobs(*args, **kwargs)


@pytest.mark.gpu
def test_linear_contrastive_logprobs_real_shape_on_gpu():
    """D = 2048, V = 151936, bf16 on the GPU: against float64 on a few tokens, bit-identical to
    three single-stream calls, and batch-invariant."""
    streams, weight, _, targets, adv, mask = make_case(4, 64, 2048, 151936, torch.bfloat16, "cuda", seed=2)
    out = linear_contrastive_logprobs(*streams, weight, targets, adv, lam=0.5, eps_w=0.2, mask=mask, backend="triton")
    sub = [s[:1, :8] for s in streams]
    lps, adv64, w64 = reference(sub, weight, None, targets[:1, :8], adv[:1], mask[:1, :8], 0.5, 0.2, 1.0)
    for got, want, name in zip(out[:3], lps, ["policy", "pos", "neg"]):
        assert_logp_close(got[:1, :8], want, torch.bfloat16, name)
    masked_targets = torch.where(mask, targets, torch.full_like(targets, -100))
    for got, h in zip(out[:3], streams):
        assert torch.equal(got, linear_token_logprobs(h, weight, masked_targets, backend="triton"))
    one = linear_contrastive_logprobs(
        *(s[2:3] for s in streams), weight, targets[2:3], adv[2:3], lam=0.5, eps_w=0.2, mask=mask[2:3], backend="triton"
    )
    for x, y in zip(one, out):
        assert torch.equal(x, y[2:3])
