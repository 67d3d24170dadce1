"""Thin wrappers over the compiled ops ``torch.ops.cepo.*`` (``csrc/``), with the same
signatures as the Triton launchers, and their fake (meta) functions for ``torch.compile``.

The schemas live in one place, ``csrc/ops.cpp``. Where an op has an optional output (entropy,
the policy stream) the compiled op returns an empty ``(0,)`` tensor and the wrapper gives None.
Import this module only after ``cepo_kernels.cuda.extension_error()`` returned None (the front
doors do): that loads the library and registers the fakes.
"""

from __future__ import annotations

import torch

_FAKES_REGISTERED: set[str] = set()


def token_logprobs_fwd(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, want_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Forward over 2-D ``logits (N, V)`` (fp16/bf16/fp32, last dim contiguous), ``targets (N,)``.
    Returns fp32 ``(logp, entropy or None, lse)``, each ``(N,)``; see ``cepo_kernels.token_logprobs``."""
    logp, entropy, lse = torch.ops.cepo.token_logprobs_fwd(
        logits, targets, float(temperature), int(ignore_index), bool(want_entropy)
    )
    return logp, (entropy if want_entropy else None), lse


def token_logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Gradient ``(N, V)`` of 2-D ``logits`` in their dtype:
    ``dx_j = (g (1[j == y] - p_j) - h p_j (z_j - (lse - H))) / T``."""
    return torch.ops.cepo.token_logprobs_bwd(
        logits, targets, lse, entropy, grad_logp, grad_entropy, float(temperature), int(ignore_index)
    )


def contrastive_logprobs_fwd(
    policy_logits: torch.Tensor | None,
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    targets: torch.Tensor,
    a_tok: torch.Tensor,
    sign: torch.Tensor,
    keep: torch.Tensor,
    lam: float,
    eps_w: float,
    temperature: float,
    ignore_index: int,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.contrastive_logprobs.contrastive_logprobs_forward``: flat
    ``(N, V)`` logits, ``targets``/``a_tok``/``sign``/``keep`` ``(N,)``. Returns fp32
    ``(policy or None, pos, neg, weights, advantages)``."""
    policy, pos, neg, weights, adv = torch.ops.cepo.contrastive_logprobs_fwd(
        policy_logits, pos_logits, neg_logits, targets,
        a_tok.float().contiguous(), sign.float().contiguous(), keep.contiguous(),
        float(lam), float(eps_w), float(temperature), int(ignore_index),
    )  # fmt: skip
    return (policy if policy_logits is not None else None), pos, neg, weights, adv


def contrastive_advantage_fwd(
    adv_tok: torch.Tensor,
    sign_tok: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    lam: float,
    eps_w: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CEPO weighting over ``pos.numel()`` tokens (inputs of one shape, fp32 ``adv_tok`` and
    ``sign_tok``). Returns flat fp32 ``(advantages, weights)``."""
    return torch.ops.cepo.contrastive_advantage_fwd(
        adv_tok.float(), sign_tok.float(), pos, neg, float(lam), float(eps_w), mask
    )


# ---------------------------------------------------------------------------------------------
# fake (meta) functions: output shapes and dtypes only, for torch.compile and opcheck
# ---------------------------------------------------------------------------------------------


def _fake_token_logprobs_fwd(logits, targets, temperature, ignore_index, want_entropy):
    torch._check(logits.dim() == 2, lambda: f"logits: expected (N, V), got {tuple(logits.shape)}")
    n = logits.shape[0]
    out = lambda size: logits.new_empty((size,), dtype=torch.float32)
    return out(n), out(n if want_entropy else 0), out(n)


def _fake_token_logprobs_bwd(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index):
    torch._check(logits.dim() == 2, lambda: f"logits: expected (N, V), got {tuple(logits.shape)}")
    return logits.new_empty(logits.shape)


def _fake_contrastive_logprobs_fwd(policy, pos, neg, targets, a_tok, sign, keep, lam, eps_w, temperature, ignore_index):
    torch._check(pos.dim() == 2, lambda: f"pos: expected (N, V), got {tuple(pos.shape)}")
    n = pos.shape[0]
    out = lambda size: pos.new_empty((size,), dtype=torch.float32)
    return out(n if policy is not None else 0), out(n), out(n), out(n), out(n)


def _fake_contrastive_advantage_fwd(a_tok, sign, pos, neg, lam, eps_w, mask):
    n = pos.numel()
    return pos.new_empty((n,), dtype=torch.float32), pos.new_empty((n,), dtype=torch.float32)


FAKES = {
    "cepo::token_logprobs_fwd": _fake_token_logprobs_fwd,
    "cepo::token_logprobs_bwd": _fake_token_logprobs_bwd,
    "cepo::contrastive_logprobs_fwd": _fake_contrastive_logprobs_fwd,
    "cepo::contrastive_advantage_fwd": _fake_contrastive_advantage_fwd,
}


def register_fakes(lib: torch.library.Library | None = None) -> None:
    """Register every fake function once (after the ops were defined by the library)."""
    for qualname, fn in FAKES.items():
        if qualname in _FAKES_REGISTERED and lib is None:
            continue
        torch.library.register_fake(qualname, fn, lib=lib)
        if lib is None:
            _FAKES_REGISTERED.add(qualname)
