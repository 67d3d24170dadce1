"""The named kernel configurations (``cepo_kernels/configs.py``, chosen with ``configs.use``): the
v2 switches of each kernel (log2-domain lane-wise row kernels, per-head-dim tree-attention tiles
with a Delta kernel, the grouped LM-head launch order with a fixed backward vocabulary chunk) and
v1 against float64 under the interpreter (or on the GPU)."""

from __future__ import annotations

import math

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels import configs
from tests.kernels.helpers import device_for, reference_logprobs64


@pytest.fixture(params=["v1", "v2"])
def config(request):
    with configs.use(request.param):
        yield request.param


def test_unknown_configuration_is_an_error():
    with pytest.raises(ValueError, match="kernel config: expected one of \\['v1', 'v2'\\], got 'v9'"):
        with configs.use("v9"):
            pass
    with pytest.raises(ValueError, match="kernel config"):
        configs.get("token_logprobs", "v9")
    assert configs.active_name() == configs.DEFAULT == "v1"


def test_use_restores_the_previous_configuration():
    with configs.use("v2"):
        assert configs.get("token_logprobs")["log2"] and configs.active_name() == "v2"
        with configs.use("v1"):
            assert not configs.get("token_logprobs")["log2"]
        assert configs.active_name() == "v2"
    assert configs.active_name() == "v1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_logprobs_configs_match_float64(config, dtype):
    device = device_for("triton")
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(9, 3001, generator=g) * 4).to(dtype)
    x[2] = float("-inf")  # an all -inf row
    x[3, 5:] = float("-inf")  # a masked vocabulary
    t = torch.randint(0, 3001, (9,), generator=g)
    t[1], t[3], t[4] = -100, 2, 7  # ignored; in the finite part; a -inf target
    xr = x.to(device).requires_grad_()
    lp, ent = ck.token_logprobs(xr, t.to(device), temperature=0.7, return_entropy=True, backend="triton")
    lp_d, ent_d = lp.detach(), ent.detach()
    x64 = x.double().requires_grad_()
    want_lp, want_ent = reference_logprobs64(x64, t, 0.7)
    assert torch.equal(torch.isfinite(lp_d.cpu()), torch.isfinite(want_lp))
    fin = torch.isfinite(want_lp)
    assert float((lp_d.cpu().double() - want_lp.detach())[fin].abs().max()) < 2e-5
    fin_e = torch.isfinite(want_ent)
    assert float((ent_d.cpu().double() - want_ent.detach())[fin_e].abs().max()) < 2e-5 and float(ent_d[2]) == 0.0
    up, ue = torch.randn(9, generator=g), torch.randn(9, generator=g)
    (gx,) = torch.autograd.grad((torch.where(torch.isfinite(lp), lp, 0) * up.to(device)).sum()
                                + (ent * ue.to(device)).sum(), xr)  # fmt: skip
    (gw,) = torch.autograd.grad((torch.where(fin, want_lp, 0) * up.double()).sum()
                                + (torch.where(fin_e, want_ent, 0) * ue.double()).sum(), x64)  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((gx.cpu().double() - torch.nan_to_num(gw)).abs().max()) < tol


def test_contrastive_logprobs_configs_match_torch(config):
    device = device_for("triton")
    g = torch.Generator().manual_seed(5)
    streams = [(torch.randn(2, 5, 777, generator=g) * 3).to(device) for _ in range(3)]
    targets = torch.randint(0, 777, (2, 5), generator=g).to(device)
    adv = torch.randn(2, generator=g).to(device)
    mask = (torch.rand(2, 5, generator=g) > 0.2).to(device)
    kw = dict(lam=0.6, eps_w=0.25, mask=mask)
    got = ck.contrastive_logprobs(*streams, targets, adv, backend="triton", **kw)
    want = ck.contrastive_logprobs(*(s.cpu() for s in streams), targets.cpu(), adv.cpu(), backend="torch",
                                   **{**kw, "mask": mask.cpu()})  # fmt: skip
    for name, a, b in zip(got._fields, got, want):
        torch.testing.assert_close(a.cpu(), b, atol=2e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("head_dim", [16, 128])
def test_tree_attention_configs_match_float64(config, head_dim):
    from tests.kernels.test_tree_attention import dense_mask64, make_qkv, random_table, reference64, rel_err

    device = device_for("triton")
    T = 70
    seg = random_table(5, 2, T, max_len=30)
    q, k, v = make_qkv(1, 2, 4, 2, T, head_dim, torch.float32, device)
    out, lse = ck.tree_attention(q, k, v, tuple(t.to(device) for t in seg), backend="triton")
    want_out, want_lse = reference64(q, k, v, dense_mask64(*seg, T).to(device), head_dim**-0.5)
    assert rel_err(out, want_out) < 2e-5 and rel_err(lse, want_lse) < 1e-5
    g = torch.Generator().manual_seed(2)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(device)

    def loss(o, l_):
        return (o.double() * go).sum() + (torch.where(torch.isfinite(l_), l_.double(), 0.0) * gl).sum()

    got = torch.autograd.grad(loss(out, lse), (q, k, v))
    want = torch.autograd.grad(loss(want_out, want_lse), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < 4e-5, f"d{name}"


def test_tree_attention_head_dim_256_is_a_clear_error_on_triton_and_torch_on_auto():
    q = torch.randn(1, 2, 8, 256)
    seg = (torch.tensor([[0]]), torch.tensor([[8]]), torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="head dim 256"):
        ck.tree_attention(q, q[:, :1], q[:, :1], seg, backend="triton")
    out, _ = ck.tree_attention(q, q[:, :1], q[:, :1], seg)  # auto: the torch backend
    assert out.shape == q.shape


def test_linear_logprobs_configs_match_float64_and_are_batch_invariant(config, monkeypatch):
    from cepo_kernels.triton import linear_logprobs as tri
    from tests.kernels.test_linear_token_logprobs import leaves64, make_case, reference64

    device = device_for("triton")
    monkeypatch.setattr(tri, "FIXED_VOCAB_CHUNK", 256)  # v2: several backward chunks
    hidden, weight, bias, targets = make_case(40, 48, 1000, torch.float32, device, seed=3)
    up = torch.linspace(-1, 1, 40, device=device)

    def run(rows):
        h = hidden[rows].detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        lp, ent = ck.linear_token_logprobs(h, w, targets[rows], bias=bias, return_entropy=True, backend="triton")
        (lp * up[rows] + 0.3 * ent).sum().backward()
        return lp, ent, h.grad, w.grad

    lp, ent, dh, dw = run(slice(0, 40))
    h64, w64 = leaves64(hidden, weight)
    want_lp, want_ent = reference64(h64, w64, targets, 1.0, bias)
    (want_lp * up.double() + 0.3 * want_ent).sum().backward()
    assert float((lp.detach().double() - want_lp.detach()).abs().max()) < 1e-4
    assert float((dh.double() - h64.grad).abs().max()) < 1e-4 and float((dw.double() - w64.grad).abs().max()) < 1e-4
    if config == "v2":  # a fixed vocabulary chunk: each row's d hidden is the same in any batch
        lp2, ent2, dh2, _ = run(slice(3, 9))
        assert torch.equal(lp2, lp[3:9]) and torch.equal(dh2, dh[3:9])
    streams = [make_case(40, 48, 1000, torch.float32, device, seed=s)[0].view(4, 10, 48) for s in (4, 5, 6)]
    out = ck.linear_contrastive_logprobs(*streams, weight, targets.view(4, 10), torch.randn(4, device=device),
                                         lam=0.5, eps_w=0.2, bias=bias, backend="triton")  # fmt: skip
    for got, s in zip(out[:3], streams):
        assert torch.equal(got, ck.linear_token_logprobs(s, weight, targets.view(4, 10), bias=bias, backend="triton"))


def test_configs_name_every_knob_in_both():
    for name in ("v1", "v2"):
        cfg = configs.CONFIGS[name]
        assert set(cfg) == set(configs.CONFIGS["v1"]), name
        for op, knobs in cfg.items():
            assert set(knobs) == set(configs.CONFIGS["v1"][op]), (name, op)
    assert math.isfinite(len(configs.CONFIGS))


def test_auto_order_is_static_and_a_gpu_run_prints_the_measured_one():
    """``auto`` follows each op's ``ORDER`` in code (no file is read on the dispatch path); a GPU
    benchmark run computes the measured order per card for a reviewer to put into ``ORDER``."""
    from bench.results_jsonl import measured_order as from_rows
    from cepo_kernels import _dispatch
    from cepo_kernels.token_logprobs import ORDER

    x = torch.zeros(2, 5)
    assert _dispatch.resolve("token_logprobs", "auto", ORDER, [x]) == "torch"
    assert not hasattr(_dispatch, "measured_order")
    rows = [{"machine": "H", "case": c, "impl": b, "config": "v1", "median_ms": t}
            for c, b, t in [("token_logprobs_fwd", "triton", 1.0), ("token_logprobs_fwd", "cuda", 0.8),
                            ("token_logprobs_bwd", "triton", 2.0), ("token_logprobs_bwd", "cuda", 2.1),
                            ("token_logprobs_fwd", "eager", 9.0), ("token_logprobs_bwd", "eager", 9.0)]]  # fmt: skip
    assert from_rows(rows) == {"H": {"token_logprobs": ["cuda", "triton", "torch"]}}
