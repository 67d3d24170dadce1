"""Benchmarks of ``token_logprobs`` (forward, forward with entropy, backward) against eager
PyTorch, per cepo backend, and TRL's fused Triton log-prob + entropy kernel (``trl.kernels``,
TRL >= 1.16, GPU).

GPU (``full``): bf16 logits 8192 x 151936 (targets: forward within 1.2x of one read of the
logits, backward within 1.3x of read + write); CPU (``tiny``): 64 x 3203. Bytes moved are the
floor of each case (``extra_info``).
"""

from __future__ import annotations

import pytest
import torch

import cepo_kernels as ck
from bench.conftest import CUDA, close, eager_logprobs, peer, skip_unusable

IMPLS = ["eager", "cuda", "triton", "torch", "trl"]


def trl_logprob_entropy():
    """TRL's ``selective_log_softmax_and_entropy`` (one Triton kernel per pass; GPU only)."""
    if not CUDA:
        pytest.skip("trl.kernels: a Triton kernel for GPU tensors")
    return peer("trl.kernels", " (TRL >= 1.16 with Triton)").selective_log_softmax_and_entropy


def _run(impl, logits, targets, entropy: bool):
    """A callable computing ``(logp, entropy or None)`` with ``impl``."""
    if impl == "eager":

        def fn():
            ls = torch.log_softmax(logits.float(), -1)
            return ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1), (-(ls.exp() * ls).sum(-1) if entropy else None)

        return fn
    if impl == "trl":
        f = trl_logprob_entropy()
        return lambda: f(logits, targets)
    if entropy:
        return lambda: ck.token_logprobs(logits, targets, return_entropy=True, backend=impl, validate=False)
    return lambda: (ck.token_logprobs(logits, targets, backend=impl, validate=False), None)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs_fwd(measure, logits_data, impl):
    (logits, *_), targets = logits_data
    skip_unusable(impl, [logits])
    want = eager_logprobs(logits, targets)
    fn = _run(impl, logits, targets, entropy=impl == "trl")  # TRL's kernel always gives both
    nbytes = logits.numel() * logits.element_size()
    measure("token_logprobs_fwd", impl, fn, check=lambda: close(fn()[0], want, 2e-3, 1e-3), bytes_moved=nbytes,
            interpreted=impl == "triton", shape=list(logits.shape))  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs_fwd_entropy(measure, logits_data, impl):
    (logits, *_), targets = logits_data
    skip_unusable(impl, [logits])
    ls = torch.log_softmax(logits.float(), -1)
    want = -(ls.exp() * ls).sum(-1)
    del ls
    fn = _run(impl, logits, targets, entropy=True)
    nbytes = logits.numel() * logits.element_size()
    measure("token_logprobs_fwd_entropy", impl, fn, check=lambda: close(fn()[1], want, 2e-3, 1e-3),
            bytes_moved=nbytes, interpreted=impl == "triton", shape=list(logits.shape))  # fmt: skip


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs_bwd(measure, logits_data, impl, with_entropy):
    """The backward alone (forward outside the timed call): read the logits, write the gradient;
    upstream gradients of the log-probs and, with ``logp+entropy``, of the entropy."""
    (logits, *_), targets = logits_data
    skip_unusable(impl, [logits])
    x = logits.clone().requires_grad_()
    g = torch.Generator(device=logits.device).manual_seed(2)
    up = torch.randn(targets.shape, device=logits.device, generator=g)
    up_ent = torch.randn(targets.shape, device=logits.device, generator=g) if with_entropy else None

    def loss(out):
        lp, ent = out
        return (lp * up).sum() + ((ent * up_ent).sum() if with_entropy else 0.0)

    want = torch.autograd.grad(loss(_run("eager", x, targets, with_entropy)()), x)[0]
    out = loss(_run(impl, x, targets, with_entropy or impl == "trl")())
    fn = lambda: torch.autograd.grad(out, x, retain_graph=True)[0]  # noqa: E731
    nbytes = 2 * logits.numel() * logits.element_size()
    measure("token_logprobs_bwd" + ("_entropy" if with_entropy else ""), impl, fn,
            check=lambda: close(fn(), want, 1e-2, 2e-2), bytes_moved=nbytes, interpreted=impl == "triton",
            shape=list(logits.shape))  # fmt: skip
