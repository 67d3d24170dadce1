"""Benchmarks of ``contrastive_logprobs`` (policy, ``r+`` and ``r-`` log-probs and the CEPO
weighting in one pass over each logits row) and ``contrastive_advantage`` (the weighting alone)
against eager PyTorch, per cepo backend.

GPU (``full``): three bf16 streams of 8192 x 151936 logits (target: within 1.2x of three reads);
CPU (``tiny``): 64 x 3203. Bytes moved are the floor of each case (``extra_info``).
"""

from __future__ import annotations

import pytest
import torch

import cepo_kernels as ck
from bench.conftest import close, eager_logprobs, skip_unusable

IMPLS = ["eager", "cuda", "triton", "torch"]


@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_logprobs(measure, logits_data, impl):
    streams, targets = logits_data
    skip_unusable(impl, streams)
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
    measure("contrastive_logprobs", impl, fn, check=lambda: close(get(), want, 2e-3, 1e-3), bytes_moved=nbytes,
            interpreted=impl == "triton", shape=[3, n, v])  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_advantage(measure, size, device, impl):
    b, t = (1024, 512) if size == "full" else (8, 64)
    g = torch.Generator(device=device).manual_seed(1)
    pos, neg = (-torch.rand(b, t, device=device, generator=g) * 5 for _ in range(2))
    adv = torch.randn(b, device=device, generator=g)
    mask = (torch.rand(b, t, device=device, generator=g) > 0.1).float()  # a TRL-style float mask
    skip_unusable(impl, [pos])

    def eager():
        w = torch.exp(torch.sign(adv)[:, None] * (pos - neg)).clamp(0.8, 1.2)
        return torch.where(mask != 0, adv[:, None] * (1 + 0.5 * (w - 1)), 0.0)

    fn = eager if impl == "eager" else (lambda: ck.contrastive_advantage(adv, pos, neg, lam=0.5, eps_w=0.2, mask=mask,
                                                                         backend=impl))  # fmt: skip
    measure("contrastive_advantage", impl, fn, check=lambda: close(fn(), eager(), 1e-5, 1e-5),
            bytes_moved=4 * 4 * pos.numel(), interpreted=impl == "triton", shape=[b, t])  # fmt: skip
