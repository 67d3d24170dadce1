"""Bodies of the ``torch.compile`` tests. ``tests/kernels/test_torch_compile.py`` runs each in a
fresh Python process (``python -c "from tests.kernels.compile_cases import X; X()"``), so the
compiled call is the first call of that process: no cache filled by an eager call or an earlier
test. Each raises (an assertion) on failure and prints ``OK`` at the end."""

from __future__ import annotations

import math

import torch

import cepo_kernels as ck
from cepo_kernels.tree_attention import tree_layout


def inputs(seed=0, b=2, t=5, v=37, d=8):
    """Three logits and three hidden streams ``(b, t, ·)``, a head ``(v, d)``, targets ``(b, t)``,
    advantages ``(b,)``."""
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(b, t, v, generator=g) for _ in range(3)]
    hidden = [torch.randn(b, t, d, generator=g) for _ in range(3)]
    weight = torch.randn(v, d, generator=g) / math.sqrt(d)
    targets = torch.randint(0, v, (b, t), generator=g)
    return logits, hidden, weight, targets, torch.randn(b, generator=g)


def _same_as_eager(fn, leaves, atol=1e-6):
    """``torch.compile(fn, fullgraph=True)`` (first call of the process) equals eager, value and
    gradients with respect to ``leaves``."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    want = fn(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want, rtol=atol, atol=atol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=atol, atol=atol)
    print("OK")


def token_logprobs_first_call(backend: str = "auto") -> None:
    logits, _, _, targets, _ = inputs(1)
    x = logits[0].clone().requires_grad_()

    def step(x_):
        lp, ent = ck.token_logprobs(x_, targets, temperature=0.8, return_entropy=True, backend=backend)
        return (lp * 2).sum() + ent.sum()

    _same_as_eager(step, [x])


def linear_token_logprobs_first_call(backend: str = "auto") -> None:
    _, hidden, weight, targets, _ = inputs(2)
    leaves = [hidden[0].clone().requires_grad_(), weight.clone().requires_grad_()]

    def step(h, w):
        lp, ent = ck.linear_token_logprobs(h, w, targets, temperature=0.9, return_entropy=True, backend=backend)
        return lp.sum() + 0.5 * ent.sum()

    _same_as_eager(step, leaves)


def cuda_token_logprobs_first_call() -> None:
    """The compiled extension under ``torch.compile`` (graph breaks allowed), bf16 on a GPU."""
    from tests.kernels.helpers import GRAD_ATOL, GRAD_RTOL, assert_close

    g = torch.Generator().manual_seed(12)
    logits = (torch.randn(4, 5, 333, generator=g) * 3).to(torch.bfloat16).cuda()
    targets = torch.randint(0, 333, (4, 5), generator=g)
    targets[0, 1] = -100
    targets = targets.cuda()

    def f(x):
        lp, ent = ck.token_logprobs(x, targets, temperature=0.9, return_entropy=True, backend="cuda")
        return (lp * 2).sum() + ent.sum()

    x_comp = logits.clone().requires_grad_()
    out = torch.compile(f, fullgraph=False)(x_comp)
    out.backward()
    x_eager = logits.clone().requires_grad_()
    f(x_eager).backward()
    assert_close(out, f(logits), 1e-5, 1e-5, "compiled loss")
    assert_close(x_comp.grad, x_eager.grad, GRAD_ATOL[torch.bfloat16], GRAD_RTOL[torch.bfloat16], "compiled grad")
    print("OK")


def public_ops_first_call() -> None:
    """Every public op inside one ``torch.compile(fullgraph=True)`` function (no graph break, no
    host sync), forward and backward, equal to eager."""
    logits, hidden, weight, targets, adv = inputs(3)
    mask = (torch.arange(5) < 4).expand(2, 5).float()  # a float mask, as TRL passes it
    layout = tree_layout(torch.tensor([[0, 3, 7]]), torch.tensor([[3, 4, 1]]), torch.tensor([[-1, 0, 0]]), 9)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 9, 8, generator=g)
    k, v = torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    leaves = [t.clone().requires_grad_() for t in (logits[0], hidden[0], weight, q, k, v)]

    def step(x, h, w, q_, k_, v_):
        lp, ent = ck.token_logprobs(x, targets, return_entropy=True)
        lin = ck.linear_token_logprobs(h, w, targets, temperature=0.9)
        con = ck.contrastive_logprobs(x.detach(), logits[1], logits[2], targets, adv, lam=0.5, eps_w=0.2, mask=mask)
        lcon = ck.linear_contrastive_logprobs(*hidden, w.detach(), targets, adv, lam=0.5, eps_w=0.2, mask=mask)
        a_t = ck.contrastive_advantage(adv, con.pos, con.neg, lam=0.5, eps_w=0.2, mask=mask)
        grp = ck.group_advantages(adv.repeat(2), group_size=2)
        o, lse = ck.tree_attention(q_, k_, v_, layout)
        o2, _ = ck.tree_attention(q_, k_, v_, layout, need_lse=False)
        lse0 = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        loss = (lp * a_t).sum() + ent.sum() + lin.sum() + o.sum() + lse0.sum() + (o2 * o2).sum()
        return loss, lcon.advantages.sum() + grp.sum() + con.weights.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got[0], leaves)
    want = step(*leaves)
    want_grads = torch.autograd.grad(want[0], leaves)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    print("OK")
