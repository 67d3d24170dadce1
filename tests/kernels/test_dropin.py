"""``docs/dropin.md``: every ``python`` block runs (in order, one namespace), and the wrappers it
defines agree with a float64 reference and with TRL's own functions (TRL installed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.kernels.helpers import reference_weighting64

DOC = Path(__file__).resolve().parents[2] / "docs" / "dropin.md"


def doc_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def doc() -> dict:
    ns: dict = {"__name__": "dropin_doc"}
    blocks = doc_blocks()
    assert len(blocks) == 3, "one block per section (TRL, verl, the CEPO advantage)"
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), ns)
    return ns


def logps64(logits, index, temperature=1.0):
    """float64 ``log_softmax(logits / T).gather(-1, index)`` and the entropy of each row."""
    ls = torch.log_softmax(logits.double() / temperature, -1)
    squeeze = index.dim() == logits.dim() - 1
    got = ls.gather(-1, index.unsqueeze(-1) if squeeze else index)
    return (got.squeeze(-1) if squeeze else got), -(ls.exp() * ls).sum(-1)


def make(dtype, shape=(3, 7), vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * 3).to(dtype)
    return logits, torch.randint(0, vocab, shape, generator=g), (torch.rand(shape, generator=g) > 0.3).long()


def test_doc_examples_run_and_give_their_shapes(doc):
    assert doc["per_token_logps"].shape == (2, 5) and doc["top3"].shape == (2, 5, 3)
    lp = doc["per_token_logps"].detach()
    assert doc["logits"].grad is not None and float(lp[0, 4]) == 0 and bool((lp[1, 3:] == 0).all())
    assert doc["log_probs"].shape == (7,) and doc["log_probs"].dtype == torch.float32
    assert doc["per_token_advantages"].shape == (4, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [None, 1, 4], ids=["index", "K1", "K4"])
def test_trl_selective_log_softmax_dropin_matches_float64(doc, dtype, k):
    logits, index, row_mask = make(dtype, seed=1)
    if k is not None:
        index = torch.randint(0, 300, (3, 7, k))
        row_mask = row_mask.unsqueeze(-1).expand(index.shape)
    got = doc["selective_log_softmax"](logits, index, temperature=0.7, row_mask=row_mask)
    want = logps64(logits, index, 0.7)[0].masked_fill(row_mask == 0, 0.0)
    assert got.dtype == dtype and got.shape == index.shape
    tol = 2e-5 if dtype == torch.float32 else 0.05  # bf16 out: the cast rounds
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol / 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [None, 3], ids=["index", "K3"])
def test_trl_selective_log_softmax_dropin_matches_trl(doc, dtype, k):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    logits, index, row_mask = make(dtype, seed=2)
    if k is not None:
        index = torch.randint(0, 300, (3, 7, k))
        row_mask = row_mask.unsqueeze(-1).expand(index.shape)
    x_ours, x_trl = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = doc["selective_log_softmax"](x_ours, index, temperature=1.3, row_mask=row_mask)
    theirs = trl_utils.selective_log_softmax(x_trl, index, temperature=1.3, row_mask=row_mask)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    # TRL's CPU path takes log_softmax in the logits' dtype: in bf16 it is the less accurate one
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)
    up = torch.randn(index.shape)
    (ours.float() * up).sum().backward()
    (theirs.float() * up).sum().backward()
    torch.testing.assert_close(x_ours.grad.float(), x_trl.grad.float(), atol=1e-5 if dtype == torch.float32 else 2e-2,
                               rtol=1e-4 if dtype == torch.float32 else 5e-2)  # fmt: skip


def test_trl_selective_log_softmax_and_entropy_dropin_matches_trl(doc):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    logits, index, row_mask = make(torch.float32, seed=3)
    x_ours, x_trl = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    lp, ent = doc["selective_log_softmax_and_entropy"](x_ours, index, temperature=0.8, row_mask=row_mask)
    lp_t, ent_t = trl_utils.selective_log_softmax_and_entropy(x_trl, index, temperature=0.8, row_mask=row_mask)
    want_lp, want_ent = logps64(logits, index, 0.8)
    for got, theirs, want in ((lp, lp_t, want_lp), (ent, ent_t, want_ent)):
        torch.testing.assert_close(got, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.double(), want.masked_fill(row_mask == 0, 0.0), atol=2e-5, rtol=1e-5)
    (lp.sum() + 0.5 * ent.sum()).backward()
    (lp_t.sum() + 0.5 * ent_t.sum()).backward()
    torch.testing.assert_close(x_ours.grad, x_trl.grad, atol=1e-5, rtol=1e-4)
    _, ent_nograd = doc["selective_log_softmax_and_entropy"](x_ours, index, entropy_requires_grad=False)
    assert not ent_nograd.requires_grad


@pytest.mark.parametrize("shape", ["rmpad-(1,N)", "padded-(B,T)"])
def test_verl_logprobs_from_logits_dropin_matches_float64(doc, shape):
    g = torch.Generator().manual_seed(4)
    if shape == "rmpad-(1,N)":
        logits, labels = torch.randn(9, 500, generator=g) * 3, torch.randint(0, 500, (1, 9), generator=g)
    else:
        logits, labels = torch.randn(2, 6, 500, generator=g) * 3, torch.randint(0, 500, (2, 6), generator=g)
    x = logits.clone().requires_grad_()
    got = doc["logprobs_from_logits"](x, labels)
    assert got.shape == logits.shape[:-1] and got.dtype == torch.float32
    x64 = logits.double().requires_grad_()
    want = logps64(x64, labels.reshape(logits.shape[:-1]))[0]
    torch.testing.assert_close(got.double(), want.detach(), atol=2e-5, rtol=1e-5)
    up = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (got * up).sum().backward()
    (want * up).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


def test_contrastive_advantage_example_matches_float64(doc):
    mask = doc["completion_mask"]
    want, _ = reference_weighting64(doc["advantages"], doc["pos_logps"], doc["neg_logps"], 0.5, 0.2, mask != 0)
    torch.testing.assert_close(doc["per_token_advantages"].double(), want, atol=1e-6, rtol=1e-6)
    assert bool((doc["per_token_advantages"][2] == 0).all())  # A = 0 stays 0
