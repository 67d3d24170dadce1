"""The ``cuda`` backend (compiled extension, ``csrc/``) against the float64 reference and the
Triton backend, on the same kinds of inputs as the other backends' tests, plus
``torch.library.opcheck`` on every op.

GPU tests are marked ``gpu`` and ``cuda_ext`` (skipped without a device or without the
extension; ``CEPO_CUDA_JIT=1`` builds it just in time). One CPU test checks the Python side that
does not need the extension: the schemas in ``csrc/ops.cpp``, the fake functions and the
wrappers in ``cepo_kernels/cuda/ops.py``, against a CPU stand-in implementation of the schemas.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels.reference import token_logprobs as ref_tok
from cepo_kernels.reference.contrastive_advantage import contrastive_weights_reference
from cepo_kernels.reference.contrastive_logprobs import contrastive_logprobs_forward
from tests.kernels.helpers import (
    DTYPE_IDS,
    DTYPES,
    GRAD_ATOL,
    GRAD_RTOL,
    LOGP_ATOL,
    LOGP_RTOL,
    assert_close,
    random_logits,
    reference_logprobs64,
    reference_weighting64,
)

OPS_CPP = Path(__file__).resolve().parents[2] / "csrc" / "ops.cpp"


def cuda_only(test):
    """GPU with the compiled extension (or CEPO_CUDA_JIT=1): skipped elsewhere by tests/conftest.py."""
    return pytest.mark.gpu(pytest.mark.cuda_ext(test))


def make_tokens(lead, vocab, dtype, seed, ignore_frac=0.25, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    logits = random_logits((*lead, vocab), dtype, device, generator=g)
    targets = torch.randint(0, vocab, lead, generator=g)
    ignored = torch.rand(lead, generator=g) < ignore_frac
    targets = torch.where(ignored, torch.full_like(targets, -100), targets).to(device)
    return logits, targets


# ---------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003, 151936], ids=lambda v: f"V{v}")
@cuda_only
def test_cuda_token_logprobs_forward_matches_reference(dtype, vocab):
    lead = (2, 3) if vocab < 32003 else (5,)
    logits, targets = make_tokens(lead, vocab, dtype, seed=vocab)
    temperature = 0.7 if vocab % 2 else 1.3
    lp, ent = ck.token_logprobs(logits, targets, temperature=temperature, return_entropy=True, backend="cuda")
    want_lp, want_ent = reference_logprobs64(logits, targets, temperature)
    assert lp.dtype == torch.float32 and lp.shape == lead and ent.shape == lead
    assert_close(lp, want_lp, LOGP_ATOL, LOGP_RTOL, "logp")
    assert_close(ent, want_ent, LOGP_ATOL, LOGP_RTOL, "entropy")
    assert torch.equal(ck.token_logprobs(logits, targets, temperature=temperature, backend="cuda"), lp)
    tri_lp, tri_ent = ck.token_logprobs(logits, targets, temperature=temperature, return_entropy=True, backend="triton")
    assert_close(lp, tri_lp, 1e-5, 1e-6, "cuda vs triton logp")
    assert_close(ent, tri_ent, 1e-5, 1e-6, "cuda vs triton entropy")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("vocab", [7, 1000, 32003, 151936], ids=lambda v: f"V{v}")
@cuda_only
def test_cuda_token_logprobs_backward_matches_reference(dtype, vocab):
    lead = (2, 3) if vocab < 32003 else (3,)
    logits, targets = make_tokens(lead, vocab, dtype, seed=100 + vocab)
    g = torch.Generator().manual_seed(7)
    up_lp = torch.randn(lead, generator=g).cuda()
    up_ent = torch.randn(lead, generator=g).cuda()
    grads = {}
    for backend in ("cuda", "triton"):
        x = logits.clone().requires_grad_()
        lp, ent = ck.token_logprobs(x, targets, temperature=1.5, return_entropy=True, backend=backend)
        ((lp * up_lp).sum() + (ent * up_ent).sum()).backward()
        grads[backend] = x.grad
    x64 = logits.double().requires_grad_()
    want_lp, want_ent = reference_logprobs64(x64, targets, 1.5)
    ((want_lp * up_lp.double()).sum() + (want_ent * up_ent.double()).sum()).backward()
    assert grads["cuda"].dtype == dtype and grads["cuda"].shape == logits.shape
    assert_close(grads["cuda"], x64.grad, GRAD_ATOL[dtype], GRAD_RTOL[dtype], "grad vs reference")
    assert_close(grads["cuda"], grads["triton"], GRAD_ATOL[dtype], GRAD_RTOL[dtype], "grad vs triton")
    assert torch.all(grads["cuda"][targets == -100] == 0)


@cuda_only
def test_cuda_token_logprobs_backward_logp_only_and_entropy_only():
    logits, targets = make_tokens((5,), 300, torch.float32, seed=3)
    for use_lp in (True, False):
        x = logits.clone().requires_grad_()
        lp, ent = ck.token_logprobs(x, targets, return_entropy=True, backend="cuda")
        w = torch.linspace(-2, 3, 5, device="cuda")
        ((lp * w).sum() if use_lp else (ent * w).sum()).backward()
        x64 = logits.double().requires_grad_()
        rl, re_ = reference_logprobs64(x64, targets)
        ((rl * w.double()).sum() if use_lp else (re_ * w.double()).sum()).backward()
        assert_close(x.grad, x64.grad, 1e-7, 1e-5, f"grad lp={use_lp}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@cuda_only
def test_cuda_token_logprobs_peaked_logits(dtype):
    vocab, n = 32003, 3
    logits = torch.full((n, vocab), -15.0)
    logits[torch.arange(n), torch.tensor([0, 12345, vocab - 1])] = 3.0
    logits = logits.to(dtype).cuda()
    targets = torch.tensor([0, 7, vocab - 1], device="cuda")
    x = logits.clone().requires_grad_()
    lp, ent = ck.token_logprobs(x, targets, temperature=1.5, return_entropy=True, backend="cuda")
    (lp.sum() + ent.sum()).backward()
    x64 = logits.double().requires_grad_()
    want_lp, want_ent = reference_logprobs64(x64, targets, 1.5)
    (want_lp.sum() + want_ent.sum()).backward()
    assert_close(lp, want_lp, 1e-6, 1e-5, "logp")
    assert_close(ent, want_ent, 1e-6, 1e-4, "entropy")
    assert_close(x.grad, x64.grad, GRAD_ATOL[dtype], GRAD_RTOL[dtype], "grad")


@pytest.mark.parametrize("vocab", [1, 7, 1000])
@cuda_only
def test_cuda_token_logprobs_all_neg_inf_but_target(vocab):
    n = 4
    targets = torch.randint(0, vocab, (n,))
    logits = torch.full((n, vocab), float("-inf"))
    logits[torch.arange(n), targets] = torch.randn(n) * 5
    logits, targets = logits.cuda().to(torch.bfloat16), targets.cuda()
    x = logits.clone().requires_grad_()
    lp, ent = ck.token_logprobs(x, targets, temperature=0.8, return_entropy=True, backend="cuda")
    (lp.sum() * 3 + ent.sum()).backward()
    assert torch.equal(lp, torch.zeros_like(lp)) and torch.equal(ent, torch.zeros_like(ent))
    assert torch.all(x.grad == 0)


@cuda_only
def test_cuda_token_logprobs_neg_inf_target_and_rows():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 50, generator=g) * 2
    logits[:, ::3] = float("-inf")
    logits[3] = float("-inf")
    targets = torch.tensor([3, 1, 4, 2])
    logits, targets = logits.cuda(), targets.cuda()
    x = logits.clone().requires_grad_()
    lp, ent = ck.token_logprobs(x, targets, return_entropy=True, backend="cuda")
    assert lp[0].item() == -math.inf and lp[3].item() == -math.inf and ent[3].item() == 0
    assert_close(lp[1:3], reference_logprobs64(logits[1:3], targets[1:3])[0], 1e-6, 1e-6, "finite rows")
    (lp[1:3].sum() + ent.sum()).backward()
    assert torch.all(torch.isfinite(x.grad))
    assert torch.all(x.grad[:, ::3] == 0) and torch.all(x.grad[3] == 0)


@cuda_only
def test_cuda_token_logprobs_ignore_index_gives_zero_everything():
    logits, targets = make_tokens((6,), 77, torch.float16, seed=5, ignore_frac=0.0)
    targets[1] = -1
    targets[4] = -1
    x = logits.clone().requires_grad_()
    lp, ent = ck.token_logprobs(x, targets, ignore_index=-1, return_entropy=True, backend="cuda")
    (lp.sum() + ent.sum()).backward()
    for row in (1, 4):
        assert lp[row].item() == 0 and ent[row].item() == 0 and torch.all(x.grad[row] == 0)
    assert torch.all(lp[[0, 2, 3, 5]] < 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("offset", [1, 3, 5])
@cuda_only
def test_cuda_token_logprobs_unaligned_rows(dtype, offset):
    """Rows that start off a 16-byte boundary (a column slice): the scalar head, the vector body
    and the tail; in backward the logits and the gradient rows are misaligned differently."""
    base, targets = make_tokens((6,), 1000 + offset, dtype, seed=offset, ignore_frac=0.0)
    logits = base[:, offset:]  # row stride 1000 + offset, start shifted by `offset` elements
    targets = targets.clamp(max=999)
    x = logits.detach().requires_grad_()
    lp, ent = ck.token_logprobs(x, targets, return_entropy=True, backend="cuda")
    (lp.sum() + 0.5 * ent.sum()).backward()
    x64 = logits.double().requires_grad_()
    rl, re_ = reference_logprobs64(x64, targets)
    (rl.sum() + 0.5 * re_.sum()).backward()
    assert_close(lp, rl, LOGP_ATOL, LOGP_RTOL, "logp")
    assert_close(ent, re_, LOGP_ATOL, LOGP_RTOL, "entropy")
    assert_close(x.grad, x64.grad, GRAD_ATOL[dtype], GRAD_RTOL[dtype], "grad")


@pytest.mark.slow
@cuda_only
def test_cuda_token_logprobs_64bit_offsets():
    """N * V > 2^31: row offsets must be int64."""
    vocab, n = 151936, 14200  # 2.16e9 elements, 4.3 GB of bf16
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), device="cuda")
    lp = ck.token_logprobs(logits, targets, backend="cuda")
    rows = torch.tensor([0, n // 2, n - 1], device="cuda")
    assert_close(lp[rows], reference_logprobs64(logits[rows], targets[rows])[0], LOGP_ATOL, LOGP_RTOL, "far rows")


# ---------------------------------------------------------------------------------------------
# contrastive_logprobs and contrastive_advantage
# ---------------------------------------------------------------------------------------------


def make_contrastive(b, t, vocab, dtypes, seed, per_token=False, with_mask=True):
    g = torch.Generator().manual_seed(seed)
    streams = [random_logits((b, t, vocab), d, "cuda", generator=g) for d in dtypes]
    targets = torch.randint(0, vocab, (b, t), generator=g)
    adv = torch.randn((b, t) if per_token else (b,), generator=g) * 2
    mask = None
    if with_mask:
        mask = torch.rand(b, t, generator=g) > 0.2
        targets = torch.where(mask, targets, torch.full_like(targets, 10**6))
        mask = mask.cuda()
    return streams, targets.cuda(), adv.cuda(), mask


def contrastive_reference(streams, targets, adv, mask, lam, eps_w, temperature):
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask
    t = torch.where(keep, targets, torch.full_like(targets, -100))
    lps = [reference_logprobs64(s, t, temperature)[0] for s in streams]
    adv64, w64 = reference_weighting64(adv, lps[1], lps[2], lam, eps_w, keep)
    return lps, adv64, w64


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003, 151936], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("per_token", [False, True], ids=["seqA", "tokA"])
@cuda_only
def test_cuda_contrastive_logprobs_forward_matches_reference(dtype, vocab, per_token):
    b, t = (2, 3) if vocab < 32003 else (1, 3)
    streams, targets, adv, mask = make_contrastive(
        b, t, vocab, [dtype] * 3, seed=vocab + per_token, per_token=per_token
    )
    kw = dict(lam=0.7, eps_w=0.3, temperature=0.5, mask=mask)
    out = ck.contrastive_logprobs(*streams, targets, adv, backend="cuda", **kw)
    lps, adv64, w64 = contrastive_reference(streams, targets, adv, mask, 0.7, 0.3, 0.5)
    for got, want, name in zip(out[:3], lps, ["policy", "pos", "neg"]):
        assert got.dtype == torch.float32 and got.shape == (b, t)
        assert_close(got, want, LOGP_ATOL, LOGP_RTOL, name)
    assert_close(out.weights, w64, 1e-5, 1e-5, "weights")
    assert_close(out.advantages, adv64, 1e-5, 1e-5, "advantages")
    assert torch.all(out.advantages[~mask] == 0) and torch.all(out.weights[~mask] == 1)
    tri = ck.contrastive_logprobs(*streams, targets, adv, backend="triton", **kw)
    for got, want, name in zip(out, tri, tri._fields):
        assert_close(got, want, 1e-5, 1e-5, f"cuda vs triton {name}")


@cuda_only
def test_cuda_contrastive_logprobs_mixed_dtypes_and_no_policy():
    """Each stream has its own dtype (a run-time branch in the kernel)."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    streams, targets, adv, mask = make_contrastive(2, 5, 1001, dtypes, seed=8)
    out = ck.contrastive_logprobs(*streams, targets, adv, lam=1.0, eps_w=0.5, mask=mask, backend="cuda")
    lps, adv64, w64 = contrastive_reference(streams, targets, adv, mask, 1.0, 0.5, 1.0)
    for got, want, name in zip(out[:3], lps, ["policy", "pos", "neg"]):
        assert_close(got, want, LOGP_ATOL, LOGP_RTOL, name)
    no_policy = ck.contrastive_logprobs(None, *streams[1:], targets, adv, lam=1.0, eps_w=0.5, mask=mask, backend="cuda")
    assert no_policy.policy is None
    assert torch.equal(no_policy.pos, out.pos) and torch.equal(no_policy.advantages, out.advantages)


@cuda_only
def test_cuda_contrastive_logprobs_equals_separate_ops():
    streams, targets, adv, _ = make_contrastive(3, 4, 333, [torch.bfloat16] * 3, seed=5, with_mask=False)
    out = ck.contrastive_logprobs(*streams, targets, adv, lam=0.4, eps_w=0.2, temperature=1.2, backend="cuda")
    singles = [ck.token_logprobs(s, targets, temperature=1.2, backend="cuda") for s in streams]
    for got, want in zip(out[:3], singles):
        assert torch.equal(got, want)
    adv_sep, w_sep = ck.contrastive_advantage(
        adv, singles[1], singles[2], lam=0.4, eps_w=0.2, return_weights=True, backend="cuda"
    )
    assert_close(out.advantages, adv_sep, 0, 0, "advantages")
    assert_close(out.weights, w_sep, 0, 0, "weights")


@cuda_only
def test_cuda_contrastive_logprobs_extreme_gaps_and_neg_inf():
    vocab = 40
    pos = torch.full((1, 4, vocab), -30.0)
    neg = torch.full((1, 4, vocab), -30.0)
    pos[0, 0, 0] = 30.0
    neg[0, 1, 1] = 30.0
    pos[0, 2, 2] = float("-inf")
    pos[0, 3, 3] = float("-inf")
    neg[0, 3, 3] = float("-inf")
    targets = torch.tensor([[0, 1, 2, 3]]).cuda()
    out = ck.contrastive_logprobs(None, pos.cuda(), neg.cuda(), targets, torch.tensor([1.5]).cuda(),
                                  lam=1.0, eps_w=0.2, backend="cuda")  # fmt: skip
    w = out.weights.cpu()[0]
    assert torch.allclose(w, torch.tensor([1.2, 0.8, 0.8, 1.0]))
    assert torch.all(torch.isfinite(out.advantages)) and torch.allclose(out.advantages.cpu()[0], 1.5 * w)


@pytest.mark.parametrize("per_token", [False, True], ids=["seqA", "tokA"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
@cuda_only
def test_cuda_contrastive_advantage_matches_reference(per_token, dtype, with_mask):
    g = torch.Generator().manual_seed(4 + per_token)
    b, t = 5, 37
    pos = (-torch.rand(b, t, generator=g) * 6).to(dtype)
    neg = (-torch.rand(b, t, generator=g) * 6).to(dtype)
    pos[0, 0] = neg[0, 0] = float("-inf")  # NaN delta: weight 1
    adv = torch.randn((b, t) if per_token else (b,), generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3) if with_mask else None
    dev = lambda x: None if x is None else x.cuda()
    got, w = ck.contrastive_advantage(dev(adv), dev(pos), dev(neg), lam=0.6, eps_w=0.25, mask=dev(mask),
                                      return_weights=True, backend="cuda")  # fmt: skip
    want, want_w = reference_weighting64(adv, pos, neg, 0.6, 0.25, mask)
    assert got.dtype == torch.float32 and got.shape == (b, t)
    assert_close(got, want, 1e-6, 1e-6, "advantages")
    assert_close(w, want_w, 1e-6, 1e-6, "weights")
    tri, tri_w = ck.contrastive_advantage(dev(adv), dev(pos), dev(neg), lam=0.6, eps_w=0.25, mask=dev(mask),
                                          return_weights=True, backend="triton")  # fmt: skip
    # Triton's exp is ex2.approx, the kernel's expf is accurate: a few ulps apart
    assert_close(got, tri, 1e-6, 1e-6, "cuda vs triton advantages")
    assert_close(w, tri_w, 1e-6, 1e-6, "cuda vs triton weights")


# ---------------------------------------------------------------------------------------------
# the compiled ops themselves: opcheck and the launchers' argument checks
# ---------------------------------------------------------------------------------------------


def op_samples(device):
    """(op name, args) pairs covering every op, optional arguments given and left out."""
    g = torch.Generator().manual_seed(0)
    n, v = 6, 37
    logits = (torch.randn(n, v, generator=g) * 2).to(device)
    targets = torch.tensor([0, 5, -100, 36, 2, 7], device=device)
    lse = torch.logsumexp(logits.float(), -1)
    lse[2] = 0.0
    ent = torch.rand(n, generator=g).to(device)
    gl, ge = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    keep = targets != -100
    a_tok, sign = torch.randn(n, generator=g).to(device), torch.sign(torch.randn(n, generator=g)).to(device)
    pos, neg = -torch.rand(n, generator=g).to(device), -torch.rand(n, generator=g).to(device)
    return [
        ("token_logprobs_fwd", (logits, targets, 1.3, -100, True)),
        ("token_logprobs_fwd", (logits.half(), targets, 0.7, -100, False)),
        ("token_logprobs_bwd", (logits, targets, lse, ent, gl, ge, 1.3, -100)),
        ("token_logprobs_bwd", (logits.bfloat16(), targets, lse, None, gl, None, 1.0, -100)),
        ("contrastive_logprobs_fwd", (logits, logits * 0.5, logits.half(), targets, a_tok, sign, keep,
                                      0.5, 0.2, 1.0, -100)),
        ("contrastive_logprobs_fwd", (None, logits, logits * 2, targets, a_tok, sign, keep, 1.0, 0.3, 0.8, -100)),
        ("contrastive_advantage_fwd", (a_tok, sign, pos, neg, 0.5, 0.2, keep)),
        ("contrastive_advantage_fwd", (a_tok.view(2, 3), sign.view(2, 3), pos.view(2, 3), neg.view(2, 3),
                                       0.5, 0.2, None)),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(8))
@cuda_only
def test_cuda_ops_pass_opcheck(index):
    name, args = op_samples("cuda")[index]
    torch.library.opcheck(getattr(torch.ops.cepo, name).default, args)


@cuda_only
def test_cuda_launchers_reject_bad_arguments():
    logits = torch.randn(3, 8, device="cuda")
    targets = torch.zeros(3, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        torch.ops.cepo.token_logprobs_fwd(logits[None], targets, 1.0, -100, False)
    with pytest.raises(RuntimeError, match="targets must have shape"):
        torch.ops.cepo.token_logprobs_fwd(logits, targets[:2], 1.0, -100, False)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        torch.ops.cepo.token_logprobs_fwd(logits.T, torch.zeros(8, dtype=torch.long, device="cuda"), 1.0, -100, False)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        torch.ops.cepo.token_logprobs_fwd(logits.double(), targets, 1.0, -100, False)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.cepo.token_logprobs_fwd(logits, targets, 0.0, -100, False)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        torch.ops.cepo.token_logprobs_fwd(logits.cpu(), targets.cpu(), 1.0, -100, False)


# ---------------------------------------------------------------------------------------------
# CPU: the schemas, fakes and wrappers, against a CPU stand-in of the compiled ops
# ---------------------------------------------------------------------------------------------


def schemas_from_ops_cpp() -> dict[str, str]:
    """The ``m.def("...")`` schemas of csrc/ops.cpp, by op name (adjacent literals joined)."""
    text = OPS_CPP.read_text()
    schemas = {}
    for call in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", text):
        schema = "".join(re.findall(r"\"([^\"]*)\"", call))
        schemas[schema.split("(", 1)[0]] = schema
    return schemas


def _cpu_token_logprobs_fwd(logits, targets, temperature, ignore_index, want_entropy):
    logp, ent, lse = ref_tok.token_logprobs_forward(logits, targets, temperature, ignore_index, want_entropy)
    return logp, ent if want_entropy else logits.new_empty((0,), dtype=torch.float32), lse


def _cpu_token_logprobs_bwd(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index):
    return ref_tok.token_logprobs_backward(
        logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index
    )


def _cpu_contrastive_logprobs_fwd(policy, pos, neg, targets, a_tok, sign, keep, lam, eps_w, temperature, ignore_index):
    out = contrastive_logprobs_forward(
        policy, pos, neg, targets, a_tok, sign, keep, lam, eps_w, temperature, ignore_index
    )
    return (out[0] if policy is not None else pos.new_empty((0,), dtype=torch.float32), *out[1:])


def _cpu_contrastive_advantage_fwd(a_tok, sign, pos, neg, lam, eps_w, mask):
    flat = lambda x: None if x is None else x.reshape(-1)
    c, adv = contrastive_weights_reference(
        flat(a_tok).float(), flat(sign).float(), flat(pos).float(), flat(neg).float(), lam, eps_w, flat(mask)
    )
    return adv.clone(), c.clone()


CPU_STAND_INS = {
    "token_logprobs_fwd": _cpu_token_logprobs_fwd,
    "token_logprobs_bwd": _cpu_token_logprobs_bwd,
    "contrastive_logprobs_fwd": _cpu_contrastive_logprobs_fwd,
    "contrastive_advantage_fwd": _cpu_contrastive_advantage_fwd,
}


@pytest.fixture
def cpu_stand_in():
    """Define the schemas of csrc/ops.cpp as torch.ops.cepo.* with CPU stand-ins and the real fakes."""
    from cepo_kernels.cuda import OP_NAMES, ops

    if any(hasattr(torch.ops.cepo, name) for name in OP_NAMES):
        pytest.skip("torch.ops.cepo is already defined (the compiled extension is loaded)")
    schemas = schemas_from_ops_cpp()
    assert set(schemas) == set(OP_NAMES) == set(CPU_STAND_INS)
    lib = torch.library.Library("cepo", "DEF")
    try:
        for name, schema in schemas.items():
            lib.define(schema)
            lib.impl(name, CPU_STAND_INS[name], "CPU")
        ops.register_fakes(lib=lib)
        yield ops
    finally:
        lib._destroy()


def test_cuda_python_side_on_cpu_stand_in(cpu_stand_in):
    ops = cpu_stand_in
    for name, args in op_samples("cpu"):
        torch.library.opcheck(getattr(torch.ops.cepo, name).default, args)
    # the wrappers turn the (0,) placeholders into None and keep the contracts of the launchers
    logits, targets = make_tokens((5,), 40, torch.float32, seed=2, device="cpu")
    logp, ent, lse = ops.token_logprobs_fwd(logits, targets, 1.2, -100, False)
    assert ent is None and logp.shape == lse.shape == (5,)
    want_lp, _ = reference_logprobs64(logits, targets, 1.2)
    assert_close(logp, want_lp, LOGP_ATOL, LOGP_RTOL, "logp")
    grad = ops.token_logprobs_bwd(logits, targets, lse, None, torch.ones(5), None, 1.2, -100)
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    out = ops.contrastive_logprobs_fwd(None, logits, logits * 0.5, targets, torch.randn(5), torch.ones(5),
                                       targets != -100, 0.5, 0.2, 1.0, -100)  # fmt: skip
    assert out[0] is None and all(o.shape == (5,) for o in out[1:])
    adv, w = ops.contrastive_advantage_fwd(torch.randn(2, 3), torch.ones(2, 3), -torch.rand(2, 3), -torch.rand(2, 3),
                                           0.5, 0.2, None)  # fmt: skip
    assert adv.shape == w.shape == (6,)
    # the fakes under torch.compile: shapes and dtypes only, no real run needed to trace
    compiled = torch.compile(lambda x, t: ops.token_logprobs_fwd(x, t, 1.0, -100, True)[1] * 2, fullgraph=True)
    assert compiled(logits, targets).shape == (5,)
