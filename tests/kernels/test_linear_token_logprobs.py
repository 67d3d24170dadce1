"""linear_token_logprobs (log-probs from hidden states and the LM-head weight) against a float64
reference built from full logits, on both backends (triton through the interpreter on CPU)."""

import math

import pytest
import torch

from cepo_kernels.linear_token_logprobs import linear_token_logprobs
from cepo_kernels.reference import linear_logprobs as ref_mod
from tests.kernels.helpers import DTYPE_IDS, backends, device_for, rel_frobenius

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# log-probs come from an fp32 accumulator whatever the input dtype; compared with a float64
# reference computed from the same (rounded) inputs
LOGP_ATOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-10}
# gradients come back in the input dtype (the logits gradient block is in that dtype too); fp32
# allows 1e-4: with peaked logits 1 - p_y cancels in fp32 (p_y = exp(z_y - lse) is fp32)
GRAD_REL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}
GRAD_COS = 0.9999

# (N, D, V): D and V not multiples of any block; N = 1; the triton interpreter keeps to small ones
SHAPES = {"triton": [(9, 123, 1000), (1, 123, 1000)], "torch": [(9, 123, 1000), (1, 123, 1000), (5, 48, 32003)]}


def cases():
    for backend in backends():
        for shape in SHAPES[backend]:
            yield pytest.param(backend, shape, id=f"{backend}-N{shape[0]}-D{shape[1]}-V{shape[2]}")


def make_case(n, d, v, dtype, device, seed, *, with_bias=True, ignore_frac=0.25, lead=None):
    """Random hidden states and head with logits of standard deviation about 3."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * (3.0 / math.sqrt(d))
    bias = torch.randn(v, generator=g) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < ignore_frac
    if n > 1:
        ignored[1] = True  # always at least one ignored row
        ignored[0] = False
    targets = torch.where(ignored, torch.full_like(targets, -100), targets)
    if lead is not None:
        hidden, targets = hidden.reshape(*lead, d), targets.reshape(lead)
    to = lambda x: None if x is None else x.to(dtype).to(device)  # noqa: E731
    return to(hidden), to(weight), to(bias), targets.to(device)


def reference64(hidden, weight, targets, temperature=1.0, bias=None, ignore_index=-100):
    """float64 ``(logp, entropy)`` through the full logits; differentiable through its inputs."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    ls = torch.log_softmax(z / temperature, dim=-1)
    keep = targets != ignore_index
    lp = ls.gather(-1, torch.where(keep, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=z.device)
    return torch.where(keep, lp, zero), torch.where(keep, ent, zero)


def leaves64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def assert_logp_close(got, want, dtype, what):
    err = (got.double().cpu() - want.double().cpu()).abs().max().item() if got.numel() else 0.0
    assert err <= LOGP_ATOL[dtype], f"{what}: max abs error {err:.3g} > {LOGP_ATOL[dtype]}"


def assert_grad_close(got, want, dtype, what):
    assert got is not None, f"{what}: no gradient"
    got64, want64 = got.double().cpu().flatten(), want.double().cpu().flatten()
    rel = rel_frobenius(got64, want64)
    cos = torch.nn.functional.cosine_similarity(got64, want64, dim=0).item()
    assert rel <= GRAD_REL[dtype], f"{what}: relative Frobenius error {rel:.3g} > {GRAD_REL[dtype]}"
    assert cos >= GRAD_COS, f"{what}: cosine {cos:.8f} < {GRAD_COS}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend,shape", list(cases()))
def test_linear_token_logprobs_forward_matches_reference(backend, shape, dtype):
    n, d, v = shape
    device = device_for(backend)
    hidden, weight, bias, targets = make_case(n, d, v, dtype, device, seed=n + d + v)
    lp, ent = linear_token_logprobs(
        hidden, weight, targets, temperature=1.3, bias=bias, return_entropy=True, backend=backend
    )
    want_lp, want_ent = reference64(hidden, weight, targets, 1.3, bias)
    assert lp.dtype == torch.float32 and lp.shape == (n,) and ent.shape == (n,)
    assert_logp_close(lp, want_lp, dtype, "logp")
    assert_logp_close(ent, want_ent, dtype, "entropy")
    ignored = targets == -100
    assert torch.all(lp[ignored] == 0) and torch.all(ent[ignored] == 0)
    # without entropy, and without the bias: the same log-probs / the bias-free reference
    assert torch.equal(linear_token_logprobs(hidden, weight, targets, temperature=1.3, bias=bias, backend=backend), lp)
    lp_nb = linear_token_logprobs(hidden, weight, targets, backend=backend)
    assert_logp_close(lp_nb, reference64(hidden, weight, targets)[0], dtype, "logp without bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend,shape", list(cases()))
def test_linear_token_logprobs_backward_matches_reference(backend, shape, dtype):
    n, d, v = shape
    device = device_for(backend)
    hidden, weight, bias, targets = make_case(n, d, v, dtype, device, seed=7 * n + d + v)
    g = torch.Generator().manual_seed(11)
    up_lp = (torch.randn(n, generator=g) * 2).to(device)  # non-uniform upstream gradients
    up_ent = torch.randn(n, generator=g).to(device)
    h, w, b = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
    lp, ent = linear_token_logprobs(h, w, targets, temperature=0.8, bias=b, return_entropy=True, backend=backend)
    ((lp * up_lp).sum() + (ent * up_ent).sum()).backward()
    h64, w64, b64 = leaves64(hidden, weight, bias)
    want_lp, want_ent = reference64(h64, w64, targets, 0.8, b64)
    ((want_lp * up_lp.double()).sum() + (want_ent * up_ent.double()).sum()).backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype and b.grad.dtype == dtype
    assert_grad_close(h.grad[targets != -100], h64.grad[targets != -100], dtype, "d hidden")
    assert_grad_close(w.grad, w64.grad, dtype, "d weight")
    assert_grad_close(b.grad, b64.grad, dtype, "d bias")
    # ignored rows: exactly zero gradient
    assert torch.all(h.grad[targets == -100] == 0)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("use_logp", [True, False], ids=["logp_only", "entropy_only"])
def test_linear_token_logprobs_backward_one_output_only(backend, use_logp):
    device = device_for(backend)
    hidden, weight, bias, targets = make_case(6, 40, 300, torch.float32, device, seed=5)
    h, w = (x.detach().clone().requires_grad_() for x in (hidden, weight))
    lp, ent = linear_token_logprobs(h, w, targets, bias=bias, return_entropy=True, backend=backend)
    up = torch.linspace(-1, 2, 6, device=device)
    ((lp if use_logp else ent) * up).sum().backward()
    h64, w64 = leaves64(hidden, weight)
    want = reference64(h64, w64, targets, 1.0, bias)[0 if use_logp else 1]
    (want * up.double()).sum().backward()
    assert_grad_close(h.grad, h64.grad, torch.float32, "d hidden")
    assert_grad_close(w.grad, w64.grad, torch.float32, "d weight")


@pytest.mark.parametrize("backend", backends())
def test_linear_token_logprobs_ignored_rows_give_exact_zeros(backend):
    device = device_for(backend)
    hidden, weight, bias, targets = make_case(5, 40, 300, torch.bfloat16, device, seed=2)
    targets = torch.full_like(targets, -100)
    targets[2] = 17
    h, w, b = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
    lp, ent = linear_token_logprobs(h, w, targets, bias=b, return_entropy=True, backend=backend)
    (lp.sum() * 3 + ent.sum()).backward()
    keep = targets != -100
    assert torch.all(lp[~keep] == 0) and torch.all(ent[~keep] == 0)
    assert torch.all(h.grad[~keep] == 0) and bool(h.grad[keep].abs().sum() > 0)
    # all rows ignored: weight and bias gradients exactly zero too
    h.grad, w.grad, b.grad = None, None, None
    lp = linear_token_logprobs(h, w, torch.full_like(targets, -100), bias=b, backend=backend)
    assert torch.all(lp == 0)
    (lp * torch.arange(5.0, device=device)).sum().backward()
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0) and torch.all(b.grad == 0)


def peaked_case(n, d, v, dtype, device):
    """Logits exactly +3 at one id per row and -15 everywhere else: weight row ``j < d - 1`` is
    ``18 e_{j+1} - 15 e_0``, the other rows ``-15 e_0``; hidden row = ``e_0 + e_{peak+1}``.
    Even rows take the peak as target, odd rows another id (log-prob about -12)."""
    weight = torch.zeros(v, d)
    weight[:, 0] = -15.0
    idx = torch.arange(d - 1)
    weight[idx, idx + 1] = 18.0
    peak = (torch.arange(n) * 7 + 3) % (d - 1)
    hidden = torch.zeros(n, d)
    hidden[:, 0] = 1.0
    hidden[torch.arange(n), peak + 1] = 1.0
    targets = torch.where(torch.arange(n) % 2 == 0, peak, (peak * 13 + 101) % v)
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), targets.to(device)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_linear_token_logprobs_peaked_logits(backend, dtype):
    """One logit at +3, the rest at -15, temperature 1.5 (the case that broke a fused kernel)."""
    device = device_for(backend)
    hidden, weight, targets = peaked_case(7, 64, 1000, dtype, device)
    z = hidden.double() @ weight.double().T
    assert torch.all((z == 3) | (z == -15)) and torch.all((z == 3).sum(-1) == 1)
    h, w = (x.detach().clone().requires_grad_() for x in (hidden, weight))
    lp, ent = linear_token_logprobs(h, w, targets, temperature=1.5, return_entropy=True, backend=backend)
    up = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0], device=device)
    ((lp * up).sum() + (ent * up.flip(0)).sum()).backward()
    h64, w64 = leaves64(hidden, weight)
    want_lp, want_ent = reference64(h64, w64, targets, 1.5)
    ((want_lp * up.double()).sum() + (want_ent * up.flip(0).double()).sum()).backward()
    assert_logp_close(lp, want_lp, dtype, "logp")
    assert_logp_close(ent, want_ent, dtype, "entropy")
    assert torch.all(lp[0::2] > -0.01) and torch.all(lp[1::2] < -11)
    assert_grad_close(h.grad, h64.grad, dtype, "d hidden")
    assert_grad_close(w.grad, w64.grad, dtype, "d weight")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_linear_token_logprobs_tied_embeddings(backend, dtype):
    """The head is the input embedding: its gradient is the head's plus the embedding's."""
    device = device_for(backend)
    n, d, v = 8, 48, 500
    g = torch.Generator().manual_seed(4)
    emb = torch.nn.Embedding(v, d).to(dtype).to(device)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(v, d, generator=g) * 0.5)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    up = torch.randn(n, generator=g).to(device)
    # a power-of-two scale keeps the embedding path exact in bf16, so the float64 reference
    # below sees the same hidden states
    hidden = emb(ids) * 0.25
    lp = linear_token_logprobs(hidden, emb.weight, targets, backend=backend)
    (lp * up).sum().backward()

    w64 = emb.weight.detach().double().requires_grad_()
    hidden64 = w64[ids] * 0.25
    want = reference64(hidden64, w64, targets)[0]
    (want * up.double()).sum().backward()
    assert_logp_close(lp, want, dtype, "logp")
    assert_grad_close(emb.weight.grad, w64.grad, dtype, "d embedding")
    # both paths contribute: the head-only gradient differs on the looked-up rows
    w_head = emb.weight.detach().double().requires_grad_()
    (reference64(hidden64.detach(), w_head, targets)[0] * up.double()).sum().backward()
    assert float((w64.grad - w_head.grad)[ids].abs().max()) > 1e-3


@pytest.mark.parametrize("backend", backends())
def test_linear_token_logprobs_batch_invariant(backend):
    """A row's log-prob and entropy are bit-identical whatever N is, whichever rows share the
    batch and wherever the row sits in it, and on every run; the backward is bit-identical
    run to run."""
    device = device_for(backend)
    n = 20 if backend == "triton" else 150  # more than one row tile / row block
    hidden, weight, bias, targets = make_case(n, 40, 300, torch.bfloat16, device, seed=9)
    full_lp, full_ent = linear_token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend)
    slices = [(0, 1), (3, 4), (n - 1, n), (5, 18), (2, n)] + ([(60, 70), (63, 129)] if n > 100 else [])
    for lo, hi in slices:
        lp, ent = linear_token_logprobs(
            hidden[lo:hi], weight, targets[lo:hi], bias=bias, return_entropy=True, backend=backend
        )
        assert torch.equal(lp, full_lp[lo:hi]), f"rows {lo}:{hi} log-probs changed with the batch"
        assert torch.equal(ent, full_ent[lo:hi]), f"rows {lo}:{hi} entropy changed with the batch"
    # a row surrounded by other rows than before
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(device)
    assert torch.equal(
        linear_token_logprobs(hidden[perm], weight, targets[perm], bias=bias, backend=backend), full_lp[perm]
    )
    grads = []
    for _ in range(2):
        h, w = (x.detach().clone().requires_grad_() for x in (hidden, weight))
        lp = linear_token_logprobs(h, w, targets, bias=bias, backend=backend)
        assert torch.equal(lp, full_lp)
        (lp * torch.linspace(-1, 1, n, device=device)).sum().backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("vocab", [100, 5000], ids=["V100", "V5000"])
def test_linear_token_logprobs_torch_batch_invariant_across_chunks(vocab):
    """The torch backend works on row chunks of ``chunk_rows(V)`` rows (a fixed matmul shape, the
    last chunk zero-padded): a row's log-prob, entropy and d hidden are bit-identical for N below,
    at and above one and two chunks, and wherever the row sits."""
    chunk = ref_mod.chunk_rows(vocab)
    n_max = 2 * chunk + 5
    hidden, weight, bias, targets = make_case(n_max, 24, vocab, torch.float32, "cpu", seed=vocab)
    up = torch.linspace(-1, 1, n_max)

    def run(rows):
        h = hidden[rows].detach().clone().requires_grad_()
        lp, ent = linear_token_logprobs(h, weight, targets[rows], bias=bias, return_entropy=True, backend="torch")
        (lp * up[rows] + 0.5 * ent).sum().backward()
        return lp, ent, h.grad

    full = run(torch.arange(n_max))
    for n in (1, 33, chunk, chunk + 1, 2 * chunk):
        for lo in (0, n_max - n):
            rows = torch.arange(lo, lo + n)
            for got, want, what in zip(run(rows), full, ("log-prob", "entropy", "d hidden")):
                assert torch.equal(got, want[rows]), f"{what} of rows {lo}:{lo + n} changed with the batch"
    perm = torch.randperm(n_max, generator=torch.Generator().manual_seed(0))
    for got, want in zip(run(perm), full):
        assert torch.equal(got, want[perm])


def test_linear_token_logprobs_real_vocabulary_torch():
    """V = 151936 on the chunked torch backend, forward and backward."""
    hidden, weight, bias, targets = make_case(3, 16, 151936, torch.bfloat16, "cpu", seed=151936)
    h, w = (x.detach().clone().requires_grad_() for x in (hidden, weight))
    lp = linear_token_logprobs(h, w, targets, temperature=1.2, bias=bias, backend="torch")
    up = torch.tensor([0.5, -1.0, 2.0])
    (lp * up).sum().backward()
    h64, w64 = leaves64(hidden, weight)
    want = reference64(h64, w64, targets, 1.2, bias)[0]
    (want * up.double()).sum().backward()
    assert_logp_close(lp, want, torch.bfloat16, "logp")
    assert_grad_close(h.grad[targets != -100], h64.grad[targets != -100], torch.bfloat16, "d hidden")
    assert_grad_close(w.grad, w64.grad, torch.bfloat16, "d weight")


def test_linear_token_logprobs_torch_blocks_agree(monkeypatch):
    """Smaller row/vocabulary blocks give the same numbers up to fp32 rounding."""
    hidden, weight, bias, targets = make_case(9, 32, 1000, torch.float32, "cpu", seed=12)
    lp, ent = linear_token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend="torch")
    monkeypatch.setattr(ref_mod, "ROW_BLOCK", 4)
    monkeypatch.setattr(ref_mod, "VOCAB_BLOCK", 96)
    lp2, ent2 = linear_token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend="torch")
    torch.testing.assert_close(lp2, lp, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ent2, ent, atol=1e-5, rtol=1e-6)


@pytest.mark.skipif("triton" not in backends(), reason="needs triton")
def test_linear_token_logprobs_triton_backward_in_several_chunks(monkeypatch):
    """The triton backward split into several vocabulary chunks (dh accumulated across them)."""
    from cepo_kernels.triton import linear_logprobs as tri

    device = device_for("triton")
    hidden, weight, bias, targets = make_case(9, 123, 1000, torch.bfloat16, device, seed=21)
    monkeypatch.setattr(tri, "G_BUDGET_BYTES", 9 * 2 * 256)  # 256 columns per chunk: 4 chunks
    assert tri.vocab_chunk(9, 1000, 2, 64) == 256
    h, w, b = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
    lp = linear_token_logprobs(h, w, targets, bias=b, backend="triton")
    up = torch.linspace(0.5, -2, 9, device=device)
    (lp * up).sum().backward()
    h64, w64, b64 = leaves64(hidden, weight, bias)
    (reference64(h64, w64, targets, 1.0, b64)[0] * up.double()).sum().backward()
    assert_grad_close(h.grad[targets != -100], h64.grad[targets != -100], torch.bfloat16, "d hidden")
    assert_grad_close(w.grad, w64.grad, torch.bfloat16, "d weight")
    assert_grad_close(b.grad, b64.grad, torch.bfloat16, "d bias")


@pytest.mark.skipif("triton" not in backends(), reason="needs triton")
def test_linear_token_logprobs_backends_agree():
    hidden, weight, bias, targets = make_case(7, 50, 700, torch.float32, "cpu", seed=31)
    out = {}
    for backend in ("torch", "triton"):
        dev = device_for(backend)
        h = hidden.to(dev).requires_grad_()
        lp, ent = linear_token_logprobs(
            h, weight.to(dev), targets.to(dev), bias=bias.to(dev), return_entropy=True, backend=backend
        )
        (lp.sum() + ent.sum()).backward()
        out[backend] = [x.detach().cpu() for x in (lp, ent, h.grad)]
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_linear_token_logprobs_float64_torch():
    hidden, weight, bias, targets = make_case(6, 30, 200, torch.float64, "cpu", seed=8)
    h, w = (x.clone().requires_grad_() for x in (hidden, weight))
    lp, ent = linear_token_logprobs(h, w, targets, temperature=0.9, bias=bias, return_entropy=True, backend="torch")
    assert lp.dtype == torch.float64 and ent.dtype == torch.float64
    h64, w64 = leaves64(hidden, weight)
    want_lp, want_ent = reference64(h64, w64, targets, 0.9, bias)
    torch.testing.assert_close(lp, want_lp, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ent, want_ent, atol=1e-12, rtol=1e-12)
    (lp.sum() - ent.sum()).backward()
    (want_lp.sum() - want_ent.sum()).backward()
    torch.testing.assert_close(h.grad, h64.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w.grad, w64.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", backends())
def test_linear_token_logprobs_leading_dims_and_empty(backend):
    """``(B, T, D)`` hidden with ``(B, T)`` targets equals the flat call; N = 0 works."""
    device = device_for(backend)
    hidden, weight, bias, targets = make_case(6, 40, 300, torch.bfloat16, device, seed=3, lead=(2, 3))
    lp = linear_token_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    assert lp.shape == (2, 3)
    flat = linear_token_logprobs(hidden.reshape(6, 40), weight, targets.reshape(6), bias=bias, backend=backend)
    assert torch.equal(lp.reshape(6), flat)
    h = hidden[:, :0].clone().requires_grad_()
    empty = linear_token_logprobs(h, weight, targets[:, :0], backend=backend)
    assert empty.shape == (2, 0)
    empty.sum().backward()
    assert h.grad.shape == h.shape


@pytest.mark.parametrize("backend", backends())
def test_linear_token_logprobs_strided_inputs(backend):
    """Row strides that are not D (slices of wider tensors) and strided targets give the same
    bits as contiguous copies."""
    device = device_for(backend)
    hidden, weight, bias, targets = make_case(8, 80, 300, torch.bfloat16, device, seed=14)
    h_s, w_s, t_s = hidden[:, :40], weight[:, :40], torch.stack([targets, targets], -1)[:, 0]
    assert h_s.stride(0) == 80 and w_s.stride(0) == 80 and t_s.stride(0) == 2
    got = linear_token_logprobs(h_s, w_s, t_s, bias=bias, backend=backend)
    want = linear_token_logprobs(h_s.contiguous(), w_s.contiguous(), t_s.contiguous(), bias=bias, backend=backend)
    assert torch.equal(got, want)


def test_linear_token_logprobs_auto_picks_torch_on_cpu():
    hidden, weight, _, targets = make_case(3, 8, 20, torch.float32, "cpu", seed=1)
    from cepo_kernels import _dispatch
    from cepo_kernels.linear_token_logprobs import OP, ORDER

    assert _dispatch.resolve(OP, "auto", ORDER, [hidden, weight]) == "torch"
    assert torch.equal(
        linear_token_logprobs(hidden, weight, targets), linear_token_logprobs(hidden, weight, targets, backend="torch")
    )


def _inputs(**override):
    base = {
        "hidden": torch.randn(4, 8),
        "weight": torch.randn(20, 8),
        "targets": torch.tensor([1, 2, 3, -100]),
    }
    base.update(override)
    return base


BAD_INPUTS = {
    "int_hidden": (_inputs(hidden=torch.zeros(4, 8, dtype=torch.long)), {}, "hidden: expected a float"),
    "int_weight": (_inputs(weight=torch.zeros(20, 8, dtype=torch.long)), {}, "weight: expected a float"),
    "weight_1d": (_inputs(weight=torch.randn(20)), {}, r"weight: expected shape \(V, D\)"),
    "d_mismatch": (_inputs(weight=torch.randn(20, 9)), {}, r"weight: expected shape \(V, 8\)"),
    "dtype_mismatch": (_inputs(weight=torch.randn(20, 8).bfloat16()), {}, "hidden: expected the same dtype"),
    "empty_vocab": (_inputs(weight=torch.randn(0, 8)), {}, "vocabulary"),
    "targets_shape": (_inputs(targets=torch.tensor([1, 2, 3])), {}, "targets: expected shape"),
    "float_targets": (_inputs(targets=torch.zeros(4)), {}, "targets: expected an integer"),
    "target_too_big": (_inputs(targets=torch.tensor([1, 20, 3, 4])), {}, "found 20"),
    "target_negative": (_inputs(targets=torch.tensor([1, -3, 3, 4])), {}, "found -3"),
    "bias_shape": (_inputs(), {"bias": torch.randn(19)}, "bias: expected shape"),
    "bias_int": (_inputs(), {"bias": torch.zeros(20, dtype=torch.long)}, "bias: expected a float"),
    "temperature_zero": (_inputs(), {"temperature": 0.0}, "temperature"),
    "temperature_negative": (_inputs(), {"temperature": -1.0}, "temperature"),
    "temperature_nan": (_inputs(), {"temperature": float("nan")}, "temperature"),
    "unknown_backend": (_inputs(), {"backend": "tpu"}, "backend: expected"),
    "no_cuda_backend": (_inputs(), {"backend": "cuda"}, "no 'cuda' implementation"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_linear_token_logprobs_rejects_bad_input(case):
    inputs, kwargs, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        linear_token_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.autocast (bf16 mixed precision as accelerate / TRL / Lightning run it). CPU autocast here;
# the op treats every device type the same way (cepo_kernels/_autocast.py).


def autocast_case(backend):
    device = device_for(backend)
    hidden, weight, bias, targets = make_case(7, 40, 300, torch.float32, device, seed=21)
    return device, hidden, weight, bias, targets, torch.linspace(-1, 1, 7, device=device)


def what_autocast_computes64(hidden, weight, bias, targets, up):
    """float64 log-probs of the bf16-rounded inputs (what the forward under autocast computes)
    and the gradients of ``sum(up * logp)`` with respect to those rounded inputs."""
    h64, w64, b64 = leaves64(*(t.to(torch.bfloat16) for t in (hidden, weight, bias)))
    lp64, _ = reference64(h64, w64, targets, 1.0, b64)
    (lp64 * up.double()).sum().backward()
    return lp64.detach(), h64.grad, w64.grad, b64.grad


@pytest.mark.parametrize("backward_inside", [True, False], ids=["backward-inside", "backward-outside"])
@pytest.mark.parametrize("backend", backends())
def test_linear_token_logprobs_under_autocast_forward_and_backward_agree(backend, backward_inside):
    device, hidden, weight, bias, targets, up = autocast_case(backend)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        lp = linear_token_logprobs(h, w, targets, bias=b, backend=backend)
        if backward_inside:
            (lp * up).sum().backward()
    if not backward_inside:
        (lp * up).sum().backward()
    want_lp, dh64, dw64, db64 = what_autocast_computes64(hidden, weight, bias, targets, up)
    assert lp.dtype == torch.float32
    assert_logp_close(lp, want_lp, torch.bfloat16, "logp under autocast")
    keep = targets != -100
    assert h.grad.dtype == w.grad.dtype == torch.float32  # fp32 leaves get fp32 gradients
    assert_grad_close(h.grad[keep], dh64[keep], torch.bfloat16, "d hidden under autocast")
    assert_grad_close(w.grad, dw64, torch.bfloat16, "d weight under autocast")
    assert_grad_close(b.grad, db64, torch.bfloat16, "d bias under autocast")
    # exactly the op on bf16 copies, outside autocast
    hb, wb, bb = (t.detach().to(torch.bfloat16).requires_grad_() for t in (hidden, weight, bias))
    lp_b = linear_token_logprobs(hb, wb, targets, bias=bb, backend=backend)
    (lp_b * up).sum().backward()
    assert torch.equal(lp, lp_b)
    assert torch.equal(h.grad, hb.grad.float()) and torch.equal(w.grad, wb.grad.float())


def test_linear_contrastive_logprobs_under_autocast_is_the_op_on_cast_inputs():
    from cepo_kernels.linear_contrastive_logprobs import linear_contrastive_logprobs

    g = torch.Generator().manual_seed(3)
    streams = [torch.randn(2, 4, 24, generator=g) for _ in range(3)]
    weight, targets, adv = (
        torch.randn(50, 24, generator=g) / 5,
        torch.randint(0, 50, (2, 4), generator=g),
        torch.randn(2),
    )
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = linear_contrastive_logprobs(*streams, weight, targets, adv, lam=0.5, eps_w=0.2, backend="torch")
    want = linear_contrastive_logprobs(*(s.bfloat16() for s in streams), weight.bfloat16(), targets, adv, lam=0.5,
                                       eps_w=0.2, backend="torch")  # fmt: skip
    for name, a, b in zip(got._fields, got, want):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_linear_token_logprobs_real_shape_on_gpu():
    """D = 2048, V = 151936 (V x D > 2^31 bytes offsets in the weight), bf16, on the GPU:
    accuracy, batch invariance between N = 1 and N = 300, and the backward against float64 on
    a few rows."""
    n, d, v = 300, 2048, 151936
    hidden, weight, _, targets = make_case(n, d, v, torch.bfloat16, "cuda", seed=1)
    lp, ent = linear_token_logprobs(hidden, weight, targets, return_entropy=True, backend="triton")
    rows = torch.tensor([0, 1, 150, n - 1], device="cuda")
    want_lp, want_ent = reference64(hidden[rows], weight, targets[rows])
    assert_logp_close(lp[rows], want_lp, torch.bfloat16, "logp")
    assert_logp_close(ent[rows], want_ent, torch.bfloat16, "entropy")
    for r in rows.tolist():
        one = linear_token_logprobs(hidden[r : r + 1], weight, targets[r : r + 1], backend="triton")
        assert torch.equal(one, lp[r : r + 1])
    h = hidden[:64].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    (
        linear_token_logprobs(h, w, targets[:64], backend="triton") * torch.linspace(-1, 1, 64, device="cuda")
    ).sum().backward()
    h64, w64 = leaves64(hidden[:64], weight)
    (reference64(h64, w64, targets[:64])[0] * torch.linspace(-1, 1, 64, device="cuda").double()).sum().backward()
    keep = targets[:64] != -100
    assert_grad_close(h.grad[keep], h64.grad[keep], torch.bfloat16, "d hidden")
    assert_grad_close(w.grad, w64.grad, torch.bfloat16, "d weight")
