"""Benchmarks of the logits-path ops (``token_logprobs`` forward and backward,
``contrastive_logprobs``, ``contrastive_advantage``) against eager PyTorch, per backend.

GPU (``full``): bf16 logits 8192 x 151936 (the targets of issues 2 and 3: forward within 1.2x of
one read of the logits, backward within 1.3x of read + write, three streams within 1.2x of three
reads); CPU (``tiny``): 64 x 3203. Bytes moved are the floor of each case (``extra_info``).
"""

from __future__ import annotations

import pytest
import torch

import cepo_kernels as ck
from bench.conftest import usable

SHAPES = {"full": (8192, 151936), "tiny": (64, 3203)}
BACKENDS = ["eager", "cuda", "triton", "torch"]


def eager_logprobs(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def data(size, device):
    n, v = SHAPES[size]
    g = torch.Generator(device=device).manual_seed(0)
    streams = [(torch.randn(n, v, device=device, generator=g) * 3).to(torch.bfloat16) for _ in range(3)]
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    return streams, targets


def _skip_unusable(impl, tensors):
    if impl != "eager" and not usable(impl, tensors):
        pytest.skip(f"{impl} cannot run here")


def _close(got, want, atol, rtol):
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", BACKENDS)
def test_token_logprobs_fwd(measure, data, impl):
    (logits, *_), targets = data
    _skip_unusable(impl, [logits])
    want = eager_logprobs(logits, targets)
    if impl == "eager":
        fn = lambda: eager_logprobs(logits, targets)  # noqa: E731
    else:
        fn = lambda: ck.token_logprobs(logits, targets, backend=impl, validate=False)  # noqa: E731
    nbytes = logits.numel() * logits.element_size()
    measure("token_logprobs_fwd", impl, fn, check=lambda: _close(fn(), want, 2e-3, 1e-3), bytes_moved=nbytes,
            interpreted=impl == "triton", shape=list(logits.shape))  # fmt: skip


@pytest.mark.parametrize("impl", BACKENDS)
def test_token_logprobs_fwd_entropy(measure, data, impl):
    (logits, *_), targets = data
    _skip_unusable(impl, [logits])
    ls = torch.log_softmax(logits.float(), -1)
    want = -(ls.exp() * ls).sum(-1)
    del ls
    if impl == "eager":

        def fn():
            ls = torch.log_softmax(logits.float(), -1)
            return ls.gather(-1, targets.unsqueeze(-1)), -(ls.exp() * ls).sum(-1)
    else:
        fn = lambda: ck.token_logprobs(logits, targets, return_entropy=True, backend=impl, validate=False)  # noqa: E731
    nbytes = logits.numel() * logits.element_size()
    measure("token_logprobs_fwd_entropy", impl, fn, check=lambda: _close(fn()[1], want, 2e-3, 1e-3),
            bytes_moved=nbytes, interpreted=impl == "triton", shape=list(logits.shape))  # fmt: skip


@pytest.mark.parametrize("impl", BACKENDS)
def test_token_logprobs_bwd(measure, data, impl):
    (logits, *_), targets = data
    _skip_unusable(impl, [logits])
    x = logits.clone().requires_grad_()
    up = torch.randn(targets.shape, device=logits.device)
    eager_out = eager_logprobs(x, targets)
    want = torch.autograd.grad(eager_out, x, up, retain_graph=True)[0]
    out = eager_out if impl == "eager" else ck.token_logprobs(x, targets, backend=impl, validate=False)
    fn = lambda: torch.autograd.grad(out, x, up, retain_graph=True)[0]  # noqa: E731
    nbytes = 2 * logits.numel() * logits.element_size()
    measure("token_logprobs_bwd", impl, fn, check=lambda: _close(fn(), want, 1e-2, 2e-2), bytes_moved=nbytes,
            interpreted=impl == "triton", shape=list(logits.shape))  # fmt: skip


@pytest.mark.parametrize("impl", BACKENDS)
def test_contrastive_logprobs(measure, data, impl):
    streams, targets = data
    _skip_unusable(impl, streams)
    n, v = streams[0].shape
    s3 = [s.view(1, n, v) for s in streams]
    t3 = targets.view(1, n)
    adv = torch.tensor([0.8], device=targets.device)

    def eager():
        lp = [eager_logprobs(s, targets) for s in streams]
        w = torch.exp(torch.sign(adv) * (lp[1] - lp[2])).clamp(0.8, 1.2)
        return adv * (1 + 0.5 * (w - 1))

    want = eager().view(1, n)
    if impl == "eager":
        fn, get = eager, lambda: eager().view(1, n)
    else:
        fn = lambda: ck.contrastive_logprobs(*s3, t3, adv, lam=0.5, eps_w=0.2, backend=impl, validate=False)  # noqa: E731
        get = lambda: fn().advantages  # noqa: E731
    nbytes = 3 * streams[0].numel() * streams[0].element_size()
    measure("contrastive_logprobs", impl, fn, check=lambda: _close(get(), want, 2e-3, 1e-3), bytes_moved=nbytes,
            interpreted=impl == "triton", shape=[3, n, v])  # fmt: skip


@pytest.mark.parametrize("impl", BACKENDS)
def test_contrastive_advantage(measure, size, device, impl):
    b, t = (1024, 512) if size == "full" else (8, 64)
    g = torch.Generator(device=device).manual_seed(1)
    pos, neg = (-torch.rand(b, t, device=device, generator=g) * 5 for _ in range(2))
    adv = torch.randn(b, device=device, generator=g)
    mask = (torch.rand(b, t, device=device, generator=g) > 0.1).float()  # a TRL-style float mask
    _skip_unusable(impl, [pos])

    def eager():
        w = torch.exp(torch.sign(adv)[:, None] * (pos - neg)).clamp(0.8, 1.2)
        return torch.where(mask != 0, adv[:, None] * (1 + 0.5 * (w - 1)), 0.0)

    fn = eager if impl == "eager" else (lambda: ck.contrastive_advantage(adv, pos, neg, lam=0.5, eps_w=0.2, mask=mask,
                                                                         backend=impl))  # fmt: skip
    measure("contrastive_advantage", impl, fn, check=lambda: _close(fn(), eager(), 1e-5, 1e-5),
            bytes_moved=4 * 4 * pos.numel(), interpreted=impl == "triton", shape=[b, t])  # fmt: skip
