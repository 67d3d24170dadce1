"""Benchmarks of the fused LM head (``linear_token_logprobs``, ``linear_contrastive_logprobs``)
against eager PyTorch, one cuBLAS matmul (the unit), Liger, Cut Cross-Entropy and TRL's chunked
log-probs from hidden states (``trl.kernels.ChunkedLogProbFunction``, TRL >= 1.16: cuBLAS tiles
folded by a Triton kernel on a GPU, torch ops elsewhere).

GPU (``full``): N=8192, D=2048, V=151936 bf16 (targets: one stream forward 1.1x of a matmul
(~7 ms), three streams 22 ms, forward + backward 26.5 ms; Cut Cross-Entropy 32.9 ms on H100).
CPU (``tiny``): N=256, D=64, V=1000. ``extra_info.flops`` counts the matmul-equivalents.
"""

from __future__ import annotations

import math

import pytest
import torch

import cepo_kernels as ck
from bench.conftest import peer, skip_unusable
from cepo_kernels.reference.contrastive_advantage import contrastive_advantage_reference

SHAPES = {"full": (8192, 2048, 151936), "tiny": (256, 64, 1000)}
LAM, EPS_W = 0.5, 0.2


def eager_logprobs(hidden, weight, targets):
    """bf16 logits, fp32 log_softmax, gather (what a trainer does without a fused head)."""
    return (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def data(size, device):
    n, d, v = SHAPES[size]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    streams = [torch.randn(n, d, device=device, generator=g).to(dtype) for _ in range(3)]
    weight = (torch.randn(v, d, device=device, generator=g) * (2.0 / math.sqrt(d))).to(dtype)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    rows = torch.arange(0, n, max(1, n // 64), device=device)[:64]
    z = streams[0][rows].double() @ weight.double().T
    want_rows = torch.log_softmax(z, -1).gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
    return streams, weight, targets, rows, want_rows


def _flops(n, d, v, matmuls):
    return 2.0 * n * d * v * matmuls


def trl_chunked(hidden, weight, targets):
    """TRL's chunked log-probs (``outputs=()``: log-probs only), as its trainers call it."""
    kernels = peer("trl.kernels", " (TRL >= 1.16)")
    chunk = 32768  # trl.trainer.utils' chunk of the vocabulary
    return kernels.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, chunk, None, 1.0, ())[0]


def test_matmul(measure, data):
    streams, weight, *_ = data
    (n, d), v = streams[0].shape, weight.shape[0]
    measure("linear_matmul_unit", "cublas" if streams[0].is_cuda else "torch", lambda: streams[0] @ weight.T,
            flops=_flops(n, d, v, 1))  # fmt: skip


@pytest.mark.parametrize("impl", ["eager", "triton", "torch", "liger", "cce", "trl"])
def test_linear_fwd(measure, data, impl):
    streams, weight, targets, rows, want_rows = data
    hidden = streams[0]
    (n, d), v = hidden.shape, weight.shape[0]
    skip_unusable(impl, [hidden, weight])
    if impl == "eager":
        fn = lambda: eager_logprobs(hidden, weight, targets)  # noqa: E731
        tol = 0.1
    elif impl in ("triton", "torch"):
        fn = lambda: ck.linear_token_logprobs(hidden, weight, targets, backend=impl, validate=False)  # noqa: E731
        tol = 1e-3
    elif impl == "liger":
        liger = peer("liger_kernel.transformers")
        loss = liger.LigerFusedLinearCrossEntropyLoss(reduction="none")
        fn = lambda: -loss(weight, hidden, targets)  # noqa: E731
        tol = 0.1
    elif impl == "trl":
        fn = lambda: trl_chunked(hidden, weight, targets)  # noqa: E731
        tol = 0.1  # bf16 logits tiles
    else:
        cce = peer("cut_cross_entropy")
        fn = lambda: -cce.linear_cross_entropy(hidden, weight, targets, reduction="none")  # noqa: E731
        tol = 0.1

    def check():
        with torch.no_grad():
            lp = fn()
            err = (lp[rows].double() - want_rows).abs().max().item()
            if impl in ("triton", "torch"):  # batch invariance and run-to-run determinism
                one = rows[5:6]
                got_one = ck.linear_token_logprobs(hidden[one], weight, targets[one], backend=impl)
                assert torch.equal(got_one, lp[one]), f"{impl}: N = 1 differs from the full batch"
                assert torch.equal(fn(), lp), f"{impl}: not deterministic run to run"
        assert err <= tol, f"{impl}: max abs error {err:.3g} vs float64"

    def run():
        with torch.no_grad():
            return fn()

    measure("linear_fwd", impl, run, check=check, flops=_flops(n, d, v, 1), interpreted=impl == "triton")


@pytest.mark.parametrize("impl", ["eager", "triton", "torch"])
def test_linear_3way_fwd(measure, data, impl):
    streams, weight, targets, *_ = data
    (n, d), v = streams[0].shape, weight.shape[0]
    skip_unusable(impl, [*streams, weight])
    batch = 8
    adv = torch.randn(batch, device=weight.device)
    three = [s.view(batch, n // batch, d) for s in streams]
    t_bt = targets.view(batch, n // batch)

    def eager():
        with torch.no_grad():
            lps = [eager_logprobs(s, weight, targets).view(batch, -1) for s in streams]
            return contrastive_advantage_reference(adv, lps[1], lps[2], lam=LAM, eps_w=EPS_W)[0]

    if impl == "eager":
        fn = eager
        check = lambda: torch.isfinite(fn()).all() or pytest.fail("non-finite")  # noqa: E731
    else:
        fn = lambda: ck.linear_contrastive_logprobs(*three, weight, t_bt, adv, lam=LAM, eps_w=EPS_W, backend=impl,
                                                    validate=False)  # fmt: skip  # noqa: E731

        def check():
            out = fn()
            for got, s in zip(out[:3], streams):
                one = ck.linear_token_logprobs(s, weight, targets, backend=impl).view(batch, -1)
                assert torch.equal(got, one), "3-way log-probs differ from single-stream calls"

    measure("linear_3way_fwd", impl, fn, check=check, flops=_flops(n, d, v, 3), interpreted=impl == "triton")


@pytest.mark.parametrize("impl", ["eager", "triton", "torch", "liger", "cce", "trl"])
def test_linear_fwd_bwd(measure, data, impl):
    streams, weight, targets, rows, _ = data
    (n, d), v = streams[0].shape, weight.shape[0]
    skip_unusable(impl, [streams[0], weight])
    h = streams[0].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    up = torch.randn(n, device=weight.device)
    if impl == "eager":
        lp_fn = lambda: eager_logprobs(h, w, targets)  # noqa: E731
    elif impl in ("triton", "torch"):
        lp_fn = lambda: ck.linear_token_logprobs(h, w, targets, backend=impl, validate=False)  # noqa: E731
    elif impl == "liger":
        liger = peer("liger_kernel.transformers")
        loss = liger.LigerFusedLinearCrossEntropyLoss(reduction="sum")
        up = None  # Liger's backward supports a summed loss only
        lp_fn = lambda: -loss(w, h, targets)  # noqa: E731
    elif impl == "trl":
        lp_fn = lambda: trl_chunked(h, w, targets)  # noqa: E731
    else:
        cce = peer("cut_cross_entropy")
        lp_fn = lambda: -cce.linear_cross_entropy(h, w, targets, reduction="none")  # noqa: E731

    def fn():
        lp = lp_fn()
        return torch.autograd.grad(lp, [h, w], grad_outputs=up if lp.dim() else None)

    def check():
        h64 = streams[0][rows].double().requires_grad_()
        lp64 = torch.log_softmax(h64 @ weight.double().T, -1).gather(-1, targets[rows, None]).squeeze(-1)
        (dh64,) = torch.autograd.grad(lp64, [h64], grad_outputs=up[rows].double() if up is not None else None)
        dh = fn()[0][rows].double()
        rel = float((dh - dh64).norm() / dh64.norm())
        assert rel < 5e-2, f"{impl}: d hidden relative error {rel:.3g}"

    measure("linear_fwd_bwd", impl, fn, check=check, flops=_flops(n, d, v, 3), interpreted=impl == "triton")
