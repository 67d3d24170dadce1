"""token_logprobs against a float64 log_softmax reference, on every backend and dtype."""

import math

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels import configs
from cepo_kernels.reference import token_logprobs as ref_mod
from tests.kernels.helpers import (
    DTYPE_IDS,
    DTYPES,
    GRAD_ATOL,
    GRAD_RTOL,
    LOGP_ATOL,
    LOGP_RTOL,
    assert_close,
    backends,
    device_for,
    random_logits,
    reference_logprobs64,
)

VOCABS = [1, 7, 1000, 32003]


def make_case(lead, vocab, dtype, device, seed, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    logits = random_logits((*lead, vocab), dtype, device, generator=g)
    targets = torch.randint(0, vocab, lead, generator=g)
    ignored = torch.rand(lead, generator=g) < ignore_frac
    targets = torch.where(ignored, torch.full_like(targets, -100), targets).to(device)
    return logits, targets


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("vocab", VOCABS, ids=lambda v: f"V{v}")
def test_token_logprobs_forward_matches_reference(backend, dtype, vocab):
    device = device_for(backend)
    lead = (2, 3) if vocab < 32003 else (3,)
    logits, targets = make_case(lead, vocab, dtype, device, seed=vocab)
    temperature = 0.7 if vocab % 2 else 1.3
    lp, ent = ck.token_logprobs(logits, targets, temperature=temperature, return_entropy=True, backend=backend)
    want_lp, want_ent = reference_logprobs64(logits, targets, temperature)
    assert lp.dtype == torch.float32 and lp.shape == lead and ent.shape == lead
    assert_close(lp, want_lp, LOGP_ATOL, LOGP_RTOL, "logp")
    assert_close(ent, want_ent, LOGP_ATOL, LOGP_RTOL, "entropy")
    # without entropy: the same log-probs
    assert torch.equal(ck.token_logprobs(logits, targets, temperature=temperature, backend=backend), lp)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("vocab", [7, 1000, 32003], ids=lambda v: f"V{v}")
def test_token_logprobs_backward_matches_reference(backend, dtype, vocab):
    device = device_for(backend)
    lead = (2, 3) if vocab < 32003 else (3,)
    logits, targets = make_case(lead, vocab, dtype, device, seed=100 + vocab)
    g = torch.Generator().manual_seed(7)
    up_lp = torch.randn(lead, generator=g).to(device)  # non-uniform upstream gradients
    up_ent = torch.randn(lead, generator=g).to(device)
    x = logits.clone().requires_grad_()
    lp, ent = ck.token_logprobs(x, targets, temperature=1.5, return_entropy=True, backend=backend)
    ((lp * up_lp).sum() + (ent * up_ent).sum()).backward()
    x64 = logits.double().requires_grad_()
    want_lp, want_ent = reference_logprobs64(x64, targets, 1.5)
    ((want_lp * up_lp.double()).sum() + (want_ent * up_ent.double()).sum()).backward()
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, GRAD_ATOL[dtype], GRAD_RTOL[dtype], "grad")
    # ignored positions get exactly zero gradient
    assert torch.all(x.grad[targets == -100] == 0)


@pytest.mark.parametrize("backend", backends())
def test_token_logprobs_backward_logp_only_and_entropy_only(backend):
    device = device_for(backend)
    logits, targets = make_case((5,), 300, torch.float32, device, seed=3)
    for use_lp in (True, False):  # log-prob gradient only, then entropy gradient only
        x = logits.clone().requires_grad_()
        lp, ent = ck.token_logprobs(x, targets, return_entropy=True, backend=backend)
        w = torch.linspace(-2, 3, 5, device=device)
        ((lp * w).sum() if use_lp else (ent * w).sum()).backward()
        x64 = logits.double().requires_grad_()
        rl, re = reference_logprobs64(x64, targets)
        ((rl * w.double()).sum() if use_lp else (re * w.double()).sum()).backward()
        assert_close(x.grad, x64.grad, 1e-7, 1e-5, f"grad lp={use_lp}")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_token_logprobs_peaked_logits(backend, dtype):
    """One logit at +3, the rest at -15, temperature 1.5: log-probs near 0 and tiny entropy
    must keep their precision (the case that broke a popular fused kernel)."""
    device = device_for(backend)
    vocab, n = 32003, 3
    logits = torch.full((n, vocab), -15.0)
    peaks = torch.tensor([0, 12345, vocab - 1])
    logits[torch.arange(n), peaks] = 3.0
    logits = logits.to(dtype).to(device)
    targets = torch.tensor([0, 7, vocab - 1], device=device)  # peak, off-peak, peak in the last (partial) block
    x = logits.clone().requires_grad_()
    lp, ent = ck.token_logprobs(x, targets, temperature=1.5, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    x64 = logits.double().requires_grad_()
    want_lp, want_ent = reference_logprobs64(x64, targets, 1.5)
    (want_lp.sum() + want_ent.sum()).backward()
    assert_close(lp, want_lp, 1e-6, 1e-5, "logp")
    assert_close(ent, want_ent, 1e-6, 1e-4, "entropy")
    assert_close(x.grad, x64.grad, GRAD_ATOL[dtype], GRAD_RTOL[dtype], "grad")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("vocab", [1, 7, 1000])
def test_token_logprobs_all_neg_inf_but_target(backend, vocab):
    device = device_for(backend)
    n = 4
    targets = torch.randint(0, vocab, (n,))
    logits = torch.full((n, vocab), float("-inf"))
    logits[torch.arange(n), targets] = torch.randn(n) * 5
    logits, targets = logits.to(device).to(torch.bfloat16), targets.to(device)
    x = logits.clone().requires_grad_()
    lp, ent = ck.token_logprobs(x, targets, temperature=0.8, return_entropy=True, backend=backend)
    (lp.sum() * 3 + ent.sum()).backward()
    assert torch.equal(lp, torch.zeros_like(lp))
    assert torch.equal(ent, torch.zeros_like(ent))
    assert torch.all(torch.isfinite(x.grad)) and torch.all(x.grad == 0)


@pytest.mark.parametrize("backend", backends())
def test_token_logprobs_neg_inf_target_and_rows(backend):
    """A target whose logit is -inf gets -inf; a row that is entirely -inf gets logp -inf,
    entropy 0 and zero gradient; other -inf entries are a masked vocabulary."""
    device = device_for(backend)
    vocab = 50
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, vocab, generator=g) * 2
    logits[:, ::3] = float("-inf")  # masked vocabulary
    logits[3] = float("-inf")  # nothing allowed at all
    targets = torch.tensor([3, 1, 4, 2])  # row 0 targets a masked (-inf) entry
    logits, targets = logits.to(device), targets.to(device)
    x = logits.clone().requires_grad_()
    lp, ent = ck.token_logprobs(x, targets, return_entropy=True, backend=backend)
    assert lp[0].item() == -math.inf and lp[3].item() == -math.inf and ent[3].item() == 0
    want_lp, want_ent = reference_logprobs64(logits[1:3], targets[1:3])
    assert_close(lp[1:3], want_lp, 1e-6, 1e-6, "finite rows")
    assert_close(
        ent[:3], reference_logprobs64(logits[:3], torch.tensor([1, 1, 4], device=device))[1], 1e-6, 1e-6, "ent"
    )
    (lp[1:3].sum() + ent.sum()).backward()
    assert torch.all(torch.isfinite(x.grad))
    assert torch.all(x.grad[:, ::3] == 0) and torch.all(x.grad[3] == 0)


@pytest.mark.parametrize("backend", backends())
def test_token_logprobs_ignore_index_gives_zero_everything(backend):
    device = device_for(backend)
    logits, targets = make_case((6,), 77, torch.float16, device, seed=5, ignore_frac=0.0)
    targets[1] = -100
    targets[4] = -1  # a custom ignore index
    x = logits.clone().requires_grad_()
    lp, ent = ck.token_logprobs(x, targets.clamp(min=-1).where(targets != -100, torch.full_like(targets, -1)),
                                ignore_index=-1, return_entropy=True, backend=backend)  # fmt: skip
    (lp.sum() + ent.sum()).backward()
    for row in (1, 4):
        assert lp[row].item() == 0 and ent[row].item() == 0 and torch.all(x.grad[row] == 0)
    assert torch.all(lp[[0, 2, 3, 5]] < 0)


def test_token_logprobs_real_vocabulary_torch():
    """One real vocabulary (151936, Qwen2/3) through the chunked torch backend, bf16."""
    vocab = 151936
    logits, targets = make_case((2, 3), vocab, torch.bfloat16, "cpu", seed=1)
    x = logits.clone().requires_grad_()
    lp, ent = ck.token_logprobs(x, targets, return_entropy=True, backend="torch")
    up = torch.randn(2, 3)
    ((lp * up).sum() - ent.sum()).backward()
    x64 = logits.double().requires_grad_()
    rl, re = reference_logprobs64(x64, targets)
    ((rl * up.double()).sum() - re.sum()).backward()
    assert_close(lp, rl, LOGP_ATOL, LOGP_RTOL, "logp")
    assert_close(ent, re, LOGP_ATOL, LOGP_RTOL, "entropy")
    assert_close(x.grad, x64.grad, GRAD_ATOL[torch.bfloat16], GRAD_RTOL[torch.bfloat16], "grad")


def test_token_logprobs_torch_backend_chunks_agree(monkeypatch):
    """Chunk boundaries inside a batch change nothing (and bound the temporaries)."""
    logits, targets = make_case((37,), 129, torch.float32, "cpu", seed=9)
    whole = ck.token_logprobs(logits, targets, return_entropy=True, backend="torch")
    monkeypatch.setattr(ref_mod, "CHUNK_ELEMENTS", 129 * 5)  # 5 rows per chunk
    assert ref_mod.chunk_rows_for(129) == 5
    chunked = ck.token_logprobs(logits, targets, return_entropy=True, backend="torch")
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_token_logprobs_float64_torch_is_exact():
    logits, targets = make_case((4, 5), 33, torch.float64, "cpu", seed=2)
    lp, ent = ck.token_logprobs(logits, targets, temperature=0.9, return_entropy=True)
    rl, re = reference_logprobs64(logits, targets, 0.9)
    assert lp.dtype == torch.float64
    assert_close(lp, rl, 1e-12, 1e-12, "logp")
    assert_close(ent, re, 1e-12, 1e-12, "entropy")
    x = logits.clone().requires_grad_()
    torch.autograd.gradcheck(
        lambda t: ck.token_logprobs(t, targets, temperature=0.9, return_entropy=True), (x,), eps=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_token_logprobs_backends_agree(dtype):
    logits, targets = make_case((3, 4), 1000, dtype, device_for("triton"), seed=21)
    a = ck.token_logprobs(logits, targets, temperature=1.1, return_entropy=True, backend="torch")
    b = ck.token_logprobs(logits, targets, temperature=1.1, return_entropy=True, backend="triton")
    assert_close(b[0], a[0], 1e-5, 1e-6, "logp")
    assert_close(b[1], a[1], 1e-5, 1e-6, "entropy")


def test_token_logprobs_non_contiguous_logits():
    base, targets = make_case((4, 6), 64, torch.float32, "cpu", seed=4)
    logits = base.transpose(0, 1)  # (6, 4, 64), rows not contiguous in memory order
    lp = ck.token_logprobs(logits, targets.T, backend="torch")
    assert_close(lp, reference_logprobs64(logits, targets.T)[0], 1e-6, 1e-6, "strided")


def test_token_logprobs_auto_picks_torch_on_cpu():
    from cepo_kernels import _dispatch
    from cepo_kernels.token_logprobs import ORDER

    assert _dispatch.resolve("token_logprobs", "auto", ORDER, [torch.zeros(2, 3)]) == "torch"


@pytest.mark.gpu
@pytest.mark.slow
def test_token_logprobs_64bit_offsets_on_gpu():
    """N * V > 2^31: row offsets must be computed in int64."""
    vocab, n = 151936, 14200  # 2.16e9 elements, 4.3 GB of bf16
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), device="cuda")
    lp = ck.token_logprobs(logits, targets, backend="triton")
    rows = torch.tensor([0, n // 2, n - 1], device="cuda")
    want = reference_logprobs64(logits[rows], targets[rows])[0]
    assert_close(lp[rows], want, LOGP_ATOL, LOGP_RTOL, "far rows")


BAD_INPUTS = {
    "shape": (lambda: (torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)), {}, "targets: expected shape"),
    "int_logits": (
        lambda: (torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long)),
        {},
        "logits: expected a float",
    ),
    "float_targets": (lambda: (torch.randn(2, 5), torch.zeros(2)), {}, "targets: expected an integer"),
    "target_too_big": (lambda: (torch.randn(2, 5), torch.tensor([1, 5])), {}, "found 5"),
    "target_negative": (lambda: (torch.randn(2, 5), torch.tensor([-3, 1])), {}, "found -3"),
    "temperature_zero": (lambda: (torch.randn(2, 5), torch.tensor([1, 2])), {"temperature": 0.0}, "temperature"),
    "temperature_nan": (
        lambda: (torch.randn(2, 5), torch.tensor([1, 2])),
        {"temperature": float("nan")},
        "temperature",
    ),
    "temperature_inf": (
        lambda: (torch.randn(2, 5), torch.tensor([1, 2])),
        {"temperature": float("inf")},
        "temperature",
    ),
    "unknown_backend": (lambda: (torch.randn(2, 5), torch.tensor([1, 2])), {"backend": "tpu"}, "backend: expected"),
    "cuda_backend_on_cpu": (lambda: (torch.randn(2, 5), torch.tensor([1, 2])), {"backend": "cuda"}, "cuda: "),
    "empty_vocab": (lambda: (torch.randn(2, 0), torch.tensor([0, 0])), {}, "vocabulary"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_token_logprobs_rejects_bad_input(case):
    make, kwargs, message = BAD_INPUTS[case]
    logits, targets = make()
    with pytest.raises(ValueError, match=message):
        ck.token_logprobs(logits, targets, **kwargs)


@pytest.mark.parametrize("config", ["v1", "v2"])
def test_token_logprobs_triton_reads_sliced_logits_in_place(config, monkeypatch):
    """``logits[:, :-1]`` (rows without one stride) goes to the Triton kernels as a 3-D view, no
    copy; log-probs, entropy and the gradient equal those of a contiguous copy bit for bit."""
    from cepo_kernels.triton import token_logprobs as tri

    with configs.use(config):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator().manual_seed(0)
        full = (torch.randn(3, 6, 300, generator=g) * 3).to(device).requires_grad_()
        targets = torch.randint(0, 300, (3, 5), generator=g).to(device)
        seen = []
        real = tri.token_logprobs_fwd
        monkeypatch.setattr(tri, "token_logprobs_fwd", lambda x, *a: seen.append(x.dim()) or real(x, *a))
        lp, ent = ck.token_logprobs(full[:, :-1], targets, return_entropy=True, backend="triton")
        assert seen == [3]
        (gx,) = torch.autograd.grad((lp * 1.5 + ent).sum(), full)
        copy = full.detach()[:, :-1].contiguous().requires_grad_()
        lp2, ent2 = ck.token_logprobs(copy, targets, return_entropy=True, backend="triton")
        (gc,) = torch.autograd.grad((lp2 * 1.5 + ent2).sum(), copy)
        assert torch.equal(lp, lp2) and torch.equal(ent, ent2)
        assert torch.equal(gx[:, :-1], gc) and bool((gx[:, -1] == 0).all())


@pytest.mark.parametrize("backend", backends())
def test_token_logprobs_under_autocast_equals_outside(backend):
    """No matmul inside: ``torch.autocast`` changes nothing, forward or backward (called inside)."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(3, 4, 300, generator=g) * 3).to(device)
    targets = torch.randint(0, 300, (3, 4), generator=g).to(device)
    outs = []
    for enabled in (True, False):
        x = logits.clone().requires_grad_()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled):
            lp, ent = ck.token_logprobs(x, targets, return_entropy=True, backend=backend)
            (lp * 1.5 + ent).sum().backward()
        outs.append((lp, ent, x.grad))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("backend", backends())
def test_token_logprobs_k_ids_per_row_match_float64(backend, k):
    """``targets (..., K)`` (TRL's ``index`` of shape ``(..., K)``): K log-probs per row, equal to
    the float64 ``log_softmax(...).gather(-1, index)``, forward, entropy and gradient."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(30 + k)
    logits = (torch.randn(2, 3, 257, generator=g) * 3).to(device)
    index = torch.randint(0, 257, (2, 3, k), generator=g).to(device)
    index[0, 1, 0] = -100  # ignored
    x = logits.clone().requires_grad_()
    lp, ent = ck.token_logprobs(x, index, temperature=0.8, return_entropy=True, backend=backend)
    assert lp.shape == ent.shape == (2, 3, k)
    x64 = logits.double().cpu().requires_grad_()
    ls = torch.log_softmax(x64 / 0.8, -1)
    keep = index.cpu() != -100
    want = torch.where(keep, ls.gather(-1, torch.where(keep, index.cpu(), 0)), 0.0)
    want_ent = torch.where(keep, -(ls.exp() * ls).sum(-1, keepdim=True), 0.0)
    assert_close(lp, want, LOGP_ATOL, LOGP_RTOL, "logp")
    assert_close(ent, want_ent, LOGP_ATOL, LOGP_RTOL, "entropy")
    up = torch.randn(2, 3, k, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((lp * up.to(device)).sum(), x)
    (gw,) = torch.autograd.grad((want * up).sum(), x64)
    assert_close(gx, gw, 1e-6, 1e-5, "d logits")


def test_token_logprobs_flat_labels_of_another_shape_say_how_to_reshape():
    """verl passes labels ``(1, N)`` with logits ``(N, V)``: a clear error naming the reshape."""
    logits, labels = torch.randn(6, 11), torch.randint(0, 11, (1, 6))
    with pytest.raises(
        ValueError, match=r"got \(1, 6\); one id per row in another shape: pass targets.reshape\(\(6,\)\)"
    ):
        ck.token_logprobs(logits, labels)
    assert torch.equal(ck.token_logprobs(logits, labels.reshape(6)), ck.token_logprobs(logits, labels[0]))
