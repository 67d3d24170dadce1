"""Shared test helpers: float64 references written independently of the package, input
makers, and tolerances per dtype."""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# Tolerance on the gradient, which the kernels return in the logits' dtype: a few ulps of
# that dtype relative to the value, plus a small absolute floor for fp16 subnormals.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float64: 1e-12}
GRAD_ATOL = {torch.float32: 1e-7, torch.bfloat16: 1e-6, torch.float16: 1e-6, torch.float64: 1e-14}
# Log-probs are fp32 from fp32 accumulation whatever the input dtype: compared with a
# float64 reference computed from the same (rounded) inputs.
LOGP_ATOL = 2e-5
LOGP_RTOL = 1e-5


def backends() -> list:
    """torch always; triton where a GPU or the interpreter can run it."""
    return ["torch", "triton"]


def device_for(backend: str) -> str:
    return "cuda" if torch.cuda.is_available() and backend != "torch" else "cpu"


def random_logits(shape, dtype, device="cpu", scale=3.0, generator=None) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * scale).to(dtype).to(device)


def reference_logprobs64(logits, targets, temperature=1.0, ignore_index=-100):
    """float64 ``(logp, entropy)`` by plain log_softmax, differentiable through ``logits``."""
    z = logits.double() / temperature
    ls = torch.log_softmax(z, dim=-1)
    keep = targets != ignore_index
    safe_t = torch.where(keep, targets, torch.zeros_like(targets)).long()
    lp = ls.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)
    p = ls.exp()
    ls_finite = torch.where(torch.isinf(ls), torch.zeros_like(ls), ls)
    ent = -(p * ls_finite).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    return torch.where(keep, lp, zero), torch.where(keep, ent, zero)


def reference_weighting64(advantages, pos, neg, lam, eps_w, mask):
    """float64 CEPO weighting, written from the formula: ``(advantages, weights)``."""
    pos, neg = pos.double(), neg.double()
    a = advantages.double()
    if a.shape == pos.shape[:-1]:
        sign = torch.sign(a).unsqueeze(-1).expand(pos.shape)
        a = a.unsqueeze(-1).expand(pos.shape)
    else:
        m = torch.ones_like(pos, dtype=torch.bool) if mask is None else mask
        sign = torch.sign((a * m).sum(-1)).unsqueeze(-1).expand(pos.shape)
    delta = pos - neg
    w = torch.exp(sign * delta)
    w = torch.where(torch.isnan(delta) | (sign == 0), torch.ones_like(w), w)
    c = w.clamp(1 - eps_w, 1 + eps_w)
    adv = a * ((1 - lam) + lam * c)
    if mask is not None:
        c = torch.where(mask, c, torch.ones_like(c))
        adv = torch.where(mask, adv, torch.zeros_like(adv))
    return adv, c


def assert_close(got, want, atol, rtol, what=""):
    torch.testing.assert_close(
        got.double().cpu(), want.double().cpu(), atol=atol, rtol=rtol, equal_nan=False, msg=lambda m: f"{what}: {m}"
    )


def rel_frobenius(got, want) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))
