"""Benchmark the logits-path ops against eager PyTorch (and each other).

Cases (bf16 logits ``N x V``; GPU default N=8192, V=151936, ``--quick`` N=64, V=32003):
- ``token_logprobs`` forward: eager ``log_softmax(logits.float() / T).gather`` vs each backend;
  floor = one read of the logits.
- ``token_logprobs`` backward (read logits, write gradient): eager autograd vs each backend.
- ``contrastive_logprobs`` (3 streams + weighting): eager (three log_softmax + gather + the
  weighting) vs each backend; floor = three reads.
- ``contrastive_advantage`` (elementwise): eager formula vs each backend.

Correctness is checked against eager before any timing. On a GPU: medians with 20/80th
percentiles, GB/s and the fraction of the measured copy bandwidth, peak extra memory.
Run: ``python -m bench.bench_logprobs [--quick] [--out DIR]``.
"""

from __future__ import annotations

import torch

import cepo_kernels as ck
from bench.common import assert_close, copy_bandwidth, parser, peak_extra_memory, print_table, record, timed
from cepo_kernels import _dispatch


def eager_logprobs(logits, targets, temperature=1.0):
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def eager_contrastive(policy, pos, neg, targets, adv, lam, eps_w):
    lp = [eager_logprobs(x, targets) for x in (policy, pos, neg)]
    w = torch.exp(torch.sign(adv).unsqueeze(-1) * (lp[1] - lp[2])).clamp(1 - eps_w, 1 + eps_w)
    return lp, adv.unsqueeze(-1) * ((1 - lam) + lam * w)


def usable_backends(tensors) -> list[str]:
    return [b for b in ("cuda", "triton", "torch") if _dispatch.why_not(b, tensors) is None and not (
        b == "triton" and tensors[0].device.type == "cpu")]  # fmt: skip


def main(argv=None) -> list[dict]:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n, vocab = (8192, 151936) if cuda and not args.quick else (64, 32003)
    bw = copy_bandwidth()
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, vocab, device=device, dtype=torch.bfloat16, generator=g) * 3
    targets = torch.randint(0, vocab, (n,), device=device, generator=g)
    nbytes = logits.numel() * logits.element_size()
    rows = []

    def add(case, impl, fn, bytes_moved, check=None):
        if check is not None:
            check()
        t = timed(fn)
        mem = peak_extra_memory(fn)
        row = {"case": case, "impl": impl, "N": n, "V": vocab, "dtype": "bf16", **t,
               "GB_s": bytes_moved / (t["median_ms"] * 1e-3) / 1e9,
               "frac_of_copy_bw": (bytes_moved / (t["median_ms"] * 1e-3) / bw) if bw else None,
               "floor_ms": (bytes_moved / bw * 1e3) if bw else None,
               "peak_extra_GB": mem / 1e9 if mem is not None else None}  # fmt: skip
        rows.append(record(row, args.out))

    # token_logprobs forward
    want = eager_logprobs(logits, targets)
    add("token_logprobs_fwd", "eager", lambda: eager_logprobs(logits, targets), nbytes)
    for b in usable_backends([logits]):
        f = lambda b=b: ck.token_logprobs(logits, targets, backend=b)  # noqa: E731
        add("token_logprobs_fwd", b, f, nbytes, lambda f=f: assert_close("fwd", f(), want, 2e-3, 1e-3))

    # token_logprobs backward (forward outside the timed region)
    grad_up = torch.randn(n, device=device, generator=g)
    x = logits.clone().requires_grad_()
    eager_out = eager_logprobs(x, targets)
    want_grad = torch.autograd.grad(eager_out, x, grad_up, retain_graph=True)[0]
    add(
        "token_logprobs_bwd", "eager", lambda: torch.autograd.grad(eager_out, x, grad_up, retain_graph=True), 2 * nbytes
    )
    for b in usable_backends([logits]):
        out = ck.token_logprobs(x, targets, backend=b)
        f = lambda out=out: torch.autograd.grad(out, x, grad_up, retain_graph=True)[0]  # noqa: E731
        add("token_logprobs_bwd", b, f, 2 * nbytes, lambda f=f: assert_close("bwd", f(), want_grad, 1e-2, 2e-2))

    # contrastive_logprobs: three streams and the weighting
    pos = torch.randn(n, vocab, device=device, dtype=torch.bfloat16, generator=g) * 3
    neg = torch.randn(n, vocab, device=device, dtype=torch.bfloat16, generator=g) * 3
    t3, p3, q3 = targets.view(1, n), pos.view(1, n, vocab), neg.view(1, n, vocab)
    adv = torch.tensor([0.8], device=device)
    (_, want_adv) = eager_contrastive(logits.view(1, n, vocab), p3, q3, t3, adv, 0.5, 0.2)
    add(
        "contrastive_logprobs",
        "eager",
        lambda: eager_contrastive(logits.view(1, n, vocab), p3, q3, t3, adv, 0.5, 0.2),
        3 * nbytes,
    )
    for b in usable_backends([logits]):
        f = lambda b=b: ck.contrastive_logprobs(
            logits.view(1, n, vocab), p3, q3, t3, adv, lam=0.5, eps_w=0.2, backend=b
        )  # noqa: E731
        add(
            "contrastive_logprobs",
            b,
            f,
            3 * nbytes,
            lambda f=f: assert_close("contrastive", f().advantages, want_adv, 2e-3, 1e-3),
        )

    # contrastive_advantage alone (elementwise over B x T)
    bt = (n // 8, 8 * 64) if cuda and not args.quick else (8, 64)
    lp_pos = -torch.rand(bt, device=device, generator=g) * 5
    lp_neg = -torch.rand(bt, device=device, generator=g) * 5
    a = torch.randn(bt[0], device=device, generator=g)
    w_eager = lambda: (
        a.unsqueeze(-1) * ((1 - 0.5) + 0.5 * torch.exp(torch.sign(a).unsqueeze(-1) * (lp_pos - lp_neg)).clamp(0.8, 1.2))
    )  # noqa: E731
    small = 4 * 3 * lp_pos.numel()
    add("contrastive_advantage", "eager", w_eager, small)
    for b in usable_backends([lp_pos]):
        f = lambda b=b: ck.contrastive_advantage(a, lp_pos, lp_neg, lam=0.5, eps_w=0.2, backend=b)  # noqa: E731
        add("contrastive_advantage", b, f, small, lambda f=f: assert_close("advantage", f(), w_eager(), 1e-5, 1e-5))

    print(
        f"\nlogits path, {rows[0]['machine']}, N={n}, V={vocab}, bf16"
        + (f", copy bandwidth {bw / 1e12:.2f} TB/s" if bw else "")
    )
    print_table(
        rows, ["case", "impl", "median_ms", "p20_ms", "p80_ms", "GB_s", "frac_of_copy_bw", "floor_ms", "peak_extra_GB"]
    )
    return rows


if __name__ == "__main__":
    main()
