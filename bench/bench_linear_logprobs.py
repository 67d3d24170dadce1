"""GPU benchmark: token log-probs straight from hidden states and the LM-head weight.

Cases, all at one shape (default N=8192 tokens, D=2048, V=151936, bf16), in one process:

- ``matmul``: one cuBLAS ``hidden @ weight.T`` (the unit: every ratio is time / this);
- ``eager_fwd`` / ``eager_fwd_bwd``: ``(hidden @ weight.T).float().log_softmax(-1).gather``
  (the backward with a per-token upstream gradient, for ``hidden`` and ``weight``);
- ``eager_3way_fwd``: three eager streams and the CEPO weighting;
- ``ours_fwd`` (1 stream), ``ours_3way_fwd`` (``linear_contrastive_logprobs``, 3 streams and the
  weighting), ``ours_fwd_bwd`` (``linear_token_logprobs`` forward + backward, per-token upstream
  gradient);
- ``liger_fwd`` / ``liger_fwd_bwd``: ``LigerFusedLinearCrossEntropyLoss`` (per-token losses for the
  forward; a summed loss for forward + backward, the only gradient it supports), if importable;
- ``cce_fwd`` / ``cce_fwd_bwd``: Cut Cross-Entropy ``linear_cross_entropy`` (per-token losses,
  per-token upstream gradient), if importable.

Every case is checked for correctness before it is timed (a case that fails its check is
reported and not timed). Timing is ``triton.testing.do_bench`` (L2 flushed; median and 20th/80th
percentiles over a 1 s window); memory is the peak allocated beyond what existed before the call
(``torch.cuda.max_memory_allocated``), which for forward + backward includes the gradients
themselves (``dW`` is ``V x D``). Results are printed as a table and appended, one JSON line per
case, to ``bench/results/<gpu name>.jsonl`` (and ``--out DIR``).

Run: ``python -m bench.bench_linear_logprobs [--quick] [--out DIR]``. Needs a CUDA GPU; without
one it prints why and exits with status 0 having measured nothing.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``cepo_kernels`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import parser, peak_extra_memory, print_table, record  # noqa: E402

LAM, EPS_W = 0.5, 0.2
SHAPES = {"full": (8192, 2048, 151936), "quick": (2048, 1024, 32000)}  # (N, D, V)
DEVICE = "cuda"


def timed(fn) -> dict:
    """``do_bench`` median and 20th/80th percentiles, with a 1 s measuring window so that even the
    ~100 ms cases get ten or more samples (``bench.common.timed`` uses 100 ms)."""
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=100, rep=1000, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}


def eager_logprobs(hidden, weight, targets):
    """The eager baseline: bf16 logits, fp32 log_softmax, gather."""
    return (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def reference_rows64(hidden, weight, targets, rows):
    """float64 log-probs of a few rows (the accuracy check)."""
    z = hidden[rows].double() @ weight.double().T
    return torch.log_softmax(z, -1).gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)


def rel_err(got, want):
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def main(argv=None) -> int:
    args = parser("log-probs from hidden states: ours vs eager vs Liger vs Cut Cross-Entropy").parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_linear_logprobs: needs a CUDA GPU and none is visible; nothing measured.")
        return 0

    import triton

    from cepo_kernels.linear_contrastive_logprobs import linear_contrastive_logprobs
    from cepo_kernels.linear_token_logprobs import linear_token_logprobs
    from cepo_kernels.reference.contrastive_advantage import contrastive_advantage_reference

    n, d, v = SHAPES["quick" if args.quick else "full"]
    batch = 8  # sequences, for the per-sequence advantages of the 3-way case
    dtype = torch.bfloat16
    dev = DEVICE
    g = torch.Generator(device=dev).manual_seed(0)
    streams = [torch.randn(n, d, device=dev, generator=g).to(dtype) for _ in range(3)]
    hidden = streams[0]
    weight = (torch.randn(v, d, device=dev, generator=g) * (2.0 / math.sqrt(d))).to(dtype)
    targets = torch.randint(0, v, (n,), device=dev, generator=g)
    upstream = torch.randn(n, device=dev, generator=g)
    adv = torch.randn(batch, device=dev, generator=g)
    check_rows = torch.arange(0, n, max(1, n // 64), device=dev)[:64]
    want_rows = reference_rows64(hidden, weight, targets, check_rows)
    shape = {"n": n, "d": d, "v": v, "dtype": "bfloat16", "streams": 1}
    rows_out: list[dict] = []
    unit = {"ms": None}

    def run_case(name, fn, check, matmuls, streams_used=1, note=""):
        """Check, then time ``fn`` and measure its peak extra memory."""
        try:
            err = check()
        except Exception as exc:  # a peer that fails its check is reported, not timed
            print(f"{name}: correctness check failed, not timed: {type(exc).__name__}: {exc}")
            rows_out.append({"case": name, "check": f"failed: {exc}"[:200]})
            return
        torch.cuda.synchronize()
        t = timed(fn)
        peak = peak_extra_memory(fn)
        case = {
            "case": name,
            **shape,
            "streams": streams_used,
            **t,
            "peak_extra_gb": None if peak is None else peak / 1e9,
            "check": err,
            "matmul_equiv": matmuls,
            "note": note,
        }
        if unit["ms"]:
            case["x_matmul"] = t["median_ms"] / unit["ms"]
            case["x_own_matmuls"] = t["median_ms"] / (unit["ms"] * matmuls) if matmuls else None
        case["tflops"] = 2.0 * n * v * d * matmuls / (t["median_ms"] * 1e-3) / 1e12 if matmuls else None
        rows_out.append(record(case, args.out))

    # --- the unit: one cuBLAS matmul -----------------------------------------------------
    def matmul():
        return hidden @ weight.T

    def check_matmul():
        out = matmul()[check_rows[:4]].double()
        want = hidden[check_rows[:4]].double() @ weight.double().T
        err = rel_err(out, want)
        assert err < 1e-2, f"matmul relative error {err:.3g}"
        return f"rel err {err:.2g}"

    run_case("matmul", matmul, check_matmul, 1)
    unit["ms"] = rows_out[-1].get("median_ms")

    # --- eager -----------------------------------------------------------------------------
    def eager_fwd():
        with torch.no_grad():
            return eager_logprobs(hidden, weight, targets)

    def check_eager_fwd():
        err = (eager_fwd()[check_rows].double() - want_rows).abs().max().item()
        assert err < 0.1, f"eager max abs error {err:.3g}"
        return f"max abs err {err:.2g} (bf16 logits)"

    run_case("eager_fwd", eager_fwd, check_eager_fwd, 1)

    h_leaf = hidden.clone().requires_grad_()
    w_leaf = weight.clone().requires_grad_()

    def eager_fwd_bwd():
        lp = eager_logprobs(h_leaf, w_leaf, targets)
        return torch.autograd.grad(lp, [h_leaf, w_leaf], grad_outputs=upstream)

    def ours_fwd_bwd():
        lp = linear_token_logprobs(h_leaf, w_leaf, targets, backend="triton")
        return torch.autograd.grad(lp, [h_leaf, w_leaf], grad_outputs=upstream)

    eager_grads: dict = {}

    def check_eager_fwd_bwd():
        dh, dw = eager_fwd_bwd()
        eager_grads["dh"], eager_grads["dw"] = dh, dw
        h64 = hidden[check_rows].double().requires_grad_()
        lp64 = torch.log_softmax(h64 @ weight.double().T, -1).gather(-1, targets[check_rows].unsqueeze(-1)).squeeze(-1)
        (dh64,) = torch.autograd.grad(lp64, [h64], grad_outputs=upstream[check_rows].double())
        eager_grads["dh64"] = dh64
        err = rel_err(dh[check_rows], dh64)
        assert err < 5e-2, f"eager d hidden relative error {err:.3g}"
        return f"d hidden rel err {err:.2g}"

    run_case("eager_fwd_bwd", eager_fwd_bwd, check_eager_fwd_bwd, 3)

    three = [s.view(batch, n // batch, d) for s in streams]
    targets_bt = targets.view(batch, n // batch)

    def eager_3way():
        with torch.no_grad():
            lps = [eager_logprobs(s, weight, targets).view(batch, n // batch) for s in streams]
            a_t, w_t = contrastive_advantage_reference(adv, lps[1], lps[2], lam=LAM, eps_w=EPS_W)
            return lps, a_t, w_t

    def check_eager_3way():
        lps, a_t, _ = eager_3way()
        assert torch.isfinite(a_t).all()
        return "finite"

    run_case("eager_3way_fwd", eager_3way, check_eager_3way, 3, streams_used=3)

    # --- ours ------------------------------------------------------------------------------
    def ours_fwd():
        with torch.no_grad():
            return linear_token_logprobs(hidden, weight, targets, backend="triton")

    def check_ours_fwd():
        lp = ours_fwd()
        err = (lp[check_rows].double() - want_rows).abs().max().item()
        assert err <= 1e-3, f"max abs error {err:.3g} vs float64"
        one = linear_token_logprobs(hidden[check_rows[5:6]], weight, targets[check_rows[5:6]], backend="triton")
        assert torch.equal(one, lp[check_rows[5:6]]), "not batch-invariant (N=1 differs from the full batch)"
        assert torch.equal(ours_fwd(), lp), "not deterministic run to run"
        return f"max abs err {err:.2g}; batch-invariant; deterministic"

    run_case("ours_fwd", ours_fwd, check_ours_fwd, 1)

    def ours_3way():
        return linear_contrastive_logprobs(
            three[0], three[1], three[2], weight, targets_bt, adv, lam=LAM, eps_w=EPS_W, backend="triton"
        )

    def check_ours_3way():
        out = ours_3way()
        for got, s in zip(out[:3], streams):
            single = linear_token_logprobs(s, weight, targets, backend="triton").view(batch, n // batch)
            assert torch.equal(got, single), "3-way log-probs differ from single-stream calls"
        a_t, w_t = contrastive_advantage_reference(adv, out.pos, out.neg, lam=LAM, eps_w=EPS_W)
        err = max((a_t - out.advantages).abs().max().item(), (w_t - out.weights).abs().max().item())
        assert err < 1e-5, f"weighting differs from the reference by {err:.3g}"
        return f"= 3 single calls; weighting err {err:.2g}"

    run_case("ours_3way_fwd", ours_3way, check_ours_3way, 3, streams_used=3)

    def check_ours_fwd_bwd():
        dh, dw = ours_fwd_bwd()
        err_h = rel_err(dh[check_rows], eager_grads["dh64"])
        err_w = rel_err(dw, eager_grads["dw"])
        assert err_h < 1e-2, f"d hidden relative error {err_h:.3g} vs float64"
        assert err_w < 3e-2, f"d weight relative error {err_w:.3g} vs eager"
        dh2, dw2 = ours_fwd_bwd()
        assert torch.equal(dh, dh2) and torch.equal(dw, dw2), "backward not deterministic run to run"
        return f"d hidden rel err {err_h:.2g} (vs fp64); d weight {err_w:.2g} (vs eager); deterministic"

    run_case("ours_fwd_bwd", ours_fwd_bwd, check_ours_fwd_bwd, 3, note="backward recomputes the logits (4 matmuls)")
    eager_grads.clear()

    # --- peers -----------------------------------------------------------------------------
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:
        print(f"liger: skipped (liger_kernel does not import: {type(exc).__name__}: {exc})")
        rows_out.append({"case": "liger_*", "check": "skipped: not importable"})
    else:
        liger_none = LigerFusedLinearCrossEntropyLoss(reduction="none")
        liger_sum = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger_fwd():
            with torch.no_grad():
                return liger_none(weight, hidden, targets)

        def check_liger_fwd():
            loss = liger_fwd()
            loss = loss[0] if isinstance(loss, tuple) else loss
            err = (-loss[check_rows].double() - want_rows).abs().max().item()
            assert err < 0.1, f"max abs error {err:.3g}"
            return f"max abs err {err:.2g}"

        run_case("liger_fwd", liger_fwd, check_liger_fwd, 1)

        def liger_fwd_bwd():
            loss = liger_sum(w_leaf, h_leaf, targets)
            loss = loss[0] if isinstance(loss, tuple) else loss
            return torch.autograd.grad(loss, [h_leaf, w_leaf])

        def check_liger_fwd_bwd():
            dh, _ = liger_fwd_bwd()
            h64 = hidden[check_rows].double().requires_grad_()
            lp64 = torch.log_softmax(h64 @ weight.double().T, -1).gather(-1, targets[check_rows].unsqueeze(-1))
            (dh64,) = torch.autograd.grad(-lp64.sum(), [h64])
            err = rel_err(dh[check_rows], dh64)
            assert err < 5e-2, f"d hidden relative error {err:.3g}"
            return f"d hidden rel err {err:.2g}"

        run_case("liger_fwd_bwd", liger_fwd_bwd, check_liger_fwd_bwd, 3, note="summed loss (no per-token grad)")

    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        print(f"cce: skipped (cut_cross_entropy does not import: {type(exc).__name__}: {exc})")
        rows_out.append({"case": "cce_*", "check": "skipped: not importable"})
    else:

        def cce_fwd():
            with torch.no_grad():
                return linear_cross_entropy(hidden, weight, targets, reduction="none")

        def check_cce_fwd():
            err = (-cce_fwd()[check_rows].double() - want_rows).abs().max().item()
            assert err < 0.1, f"max abs error {err:.3g}"
            return f"max abs err {err:.2g}"

        run_case("cce_fwd", cce_fwd, check_cce_fwd, 1)

        def cce_fwd_bwd():
            loss = linear_cross_entropy(h_leaf, w_leaf, targets, reduction="none")
            return torch.autograd.grad(loss, [h_leaf, w_leaf], grad_outputs=-upstream)

        def check_cce_fwd_bwd():
            dh, _ = cce_fwd_bwd()
            h64 = hidden[check_rows].double().requires_grad_()
            lp64 = torch.log_softmax(h64 @ weight.double().T, -1).gather(-1, targets[check_rows].unsqueeze(-1))
            (dh64,) = torch.autograd.grad(lp64.squeeze(-1), [h64], grad_outputs=upstream[check_rows].double())
            err = rel_err(dh[check_rows], dh64)
            assert err < 5e-2, f"d hidden relative error {err:.3g}"
            return f"d hidden rel err {err:.2g}"

        run_case("cce_fwd_bwd", cce_fwd_bwd, check_cce_fwd_bwd, 3, note="default gradient filtering")

    print()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  N={n} D={d} V={v}")
    cols = ["case", "median_ms", "p20_ms", "p80_ms", "x_matmul", "x_own_matmuls", "peak_extra_gb", "check"]
    print_table(rows_out, cols)
    print("\nreproduce: python -m bench.bench_linear_logprobs" + (" --quick" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
