"""Benchmark of the ``cuda`` backend (csrc/) against Triton and eager PyTorch on the
memory-bound log-prob ops, GPU only.

Cases (bf16 logits ``8192 x 151936`` unless ``--quick``):

- ``token_logprobs_fwd``: log-probs (and, separately, with entropy). Floor: one read of the
  logits, ``N * V * 2`` bytes, at the card's measured copy bandwidth.
- ``token_logprobs_bwd``: the gradient from saved ``lse`` (upstream gradient of logp and entropy).
  Floor: one read of the logits and one write of the gradient, ``2 * N * V * 2`` bytes.
- ``contrastive_logprobs_fwd``: policy, r+ and r- streams and the CEPO weighting. Floor: one read
  of each of the three logits tensors.

Every backend is checked before it is timed: against a float64 reference on a sample of rows,
and cuda against triton on all rows. Results: one JSON line per case appended to
``bench/results/<gpu>.jsonl`` (and ``--out DIR``), with the median and 20th/80th percentile
times, GB/s, the floor, the ratio to it, and the measured copy bandwidth.

Run: ``CEPO_CUDA_JIT=1 python -m bench.bench_cuda_logprobs [--quick] [--out DIR]`` (the JIT
build is used when the extension was not built with the package; it is the default here).
Without a GPU, ``--quick`` is a smoke run of the script itself (tiny shapes, eager and the Triton
interpreter, nothing recorded); without ``--quick`` it measures nothing.
"""

from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("CEPO_CUDA_JIT", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # smoke run: Triton kernels through the interpreter (set before they import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import common  # noqa: E402

BACKENDS = ("cuda", "triton", "eager")


def reference64(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-probs and entropy of a few rows."""
    ls = torch.log_softmax(logits.double() / temperature, -1)
    lp = ls.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    p = ls.exp()
    ent = -(p * torch.where(torch.isinf(ls), torch.zeros_like(ls), ls)).sum(-1)
    return lp, ent


def eager_fwd(logits, targets, temperature, want_entropy):
    """Plain PyTorch: an fp32 log_softmax of the whole (N, V) tensor, then a gather."""
    ls = torch.log_softmax(logits.float() / temperature, -1)
    lp = ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not want_entropy:
        return lp, None
    return lp, -(ls.exp() * ls).sum(-1)


def launchers(backend: str):
    if backend == "cuda":
        from cepo_kernels.cuda import ops

        return ops
    from cepo_kernels.triton import contrastive_logprobs, token_logprobs

    class _Triton:
        token_logprobs_fwd = staticmethod(token_logprobs.token_logprobs_fwd)
        token_logprobs_bwd = staticmethod(token_logprobs.token_logprobs_bwd)
        contrastive_logprobs_fwd = staticmethod(contrastive_logprobs.contrastive_logprobs_fwd)

    return _Triton


def available_backends() -> list[str]:
    from cepo_kernels import _dispatch

    names = []
    for name in BACKENDS:
        if name == "eager":
            names.append(name)
            continue
        probe = torch.zeros(1, 8, device=DEVICE, dtype=torch.bfloat16)
        why = _dispatch.why_not(name, [probe], op="token_logprobs")
        if why:
            print(f"skipping {name}: {why}")
        else:
            names.append(name)
    return names


def case_record(op, backend, n, v, dtype, t, nbytes, copy_bw, peak, **extra) -> dict:
    """One result line; ``nbytes`` is the op's minimum traffic, its floor ``nbytes / copy_bw``."""
    floor_ms = nbytes / copy_bw * 1e3 if copy_bw else None
    return {
        "bench": "cuda_logprobs",
        "op": op,
        "backend": backend,
        "shape": [n, v],
        "dtype": str(dtype).replace("torch.", ""),
        **t,
        "gbps": nbytes / (t["median_ms"] * 1e-3) / 1e9,
        "floor_ms": floor_ms,
        "ratio_to_floor": t["median_ms"] / floor_ms if floor_ms else None,
        "copy_bw_gbps": copy_bw / 1e9 if copy_bw else None,
        "peak_extra_bytes": peak,
        **extra,
    }


def check_rows(name, logp, ent, logits, targets, temperature, rows):
    """Sampled rows against float64; eager (a plain fp32 log_softmax) gets a looser bound."""
    tol = 1e-4 if name.startswith("eager") else 2e-5
    want_lp, want_ent = reference64(logits[rows], targets[rows], temperature)
    common.assert_close(f"{name} logp", logp[rows], want_lp, atol=tol, rtol=tol / 2)
    if ent is not None:
        common.assert_close(f"{name} entropy", ent[rows], want_ent, atol=tol, rtol=tol / 2)


def main(argv: list[str] | None = None) -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    if DEVICE == "cpu" and not args.quick:
        print("bench_cuda_logprobs needs a CUDA device; nothing measured (--quick runs a CPU smoke test)")
        return 0
    n, v = (8192, 151936) if not args.quick else ((512, 151936) if DEVICE == "cuda" else (4, 1000))
    save = (lambda rec: common.record(rec, args.out)) if DEVICE == "cuda" else (lambda rec: rec)
    dtype, temperature = torch.bfloat16, 1.0
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(n, v, device=DEVICE, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    rows = torch.tensor([0, 1, n // 2, n - 1], device=DEVICE)
    copy_bw = common.copy_bandwidth()
    elem = logits.element_size()
    backends = available_backends()
    results = []

    # token_logprobs forward, without and with entropy
    for want_entropy in (False, True):
        outs = {}
        for backend in backends:
            if backend == "eager":
                fn = lambda w=want_entropy: eager_fwd(logits, targets, temperature, w)  # noqa: E731
            else:
                launch = launchers(backend).token_logprobs_fwd
                fn = lambda launch=launch, w=want_entropy: launch(logits, targets, temperature, -100, w)  # noqa: E731
            out = fn()
            check_rows(backend, out[0], out[1], logits, targets, temperature, rows)
            outs[backend] = out
            nbytes = n * v * elem
            rec = case_record(
                "token_logprobs_fwd" + ("+entropy" if want_entropy else ""), backend, n, v, dtype,
                common.timed(fn), nbytes, copy_bw, common.peak_extra_memory(fn),
            )  # fmt: skip
            results.append(save(rec))
        if "cuda" in outs and "triton" in outs:
            common.assert_close("cuda vs triton logp", outs["cuda"][0], outs["triton"][0], atol=1e-5, rtol=1e-6)

    # token_logprobs backward from saved lse; upstream gradients of logp and entropy
    up_lp = torch.randn(n, device=DEVICE, generator=g)
    up_ent = torch.randn(n, device=DEVICE, generator=g)
    grads = {}
    for backend in backends:
        if backend == "eager":
            x = logits.detach().requires_grad_()
            lp, ent = eager_fwd(x, targets, temperature, True)
            loss = (lp * up_lp).sum() + (ent * up_ent).sum()
            fn = lambda loss=loss, x=x: torch.autograd.grad(loss, x, retain_graph=True)[0]  # noqa: E731
        else:
            lib = launchers(backend)
            _, ent, lse = lib.token_logprobs_fwd(logits, targets, temperature, -100, True)
            fn = lambda lib=lib, ent=ent, lse=lse: lib.token_logprobs_bwd(  # noqa: E731
                logits, targets, lse, ent, up_lp, up_ent, temperature, -100
            )
        grads[backend] = fn()
        nbytes = 2 * n * v * elem
        rec = case_record(
            "token_logprobs_bwd", backend, n, v, dtype, common.timed(fn), nbytes, copy_bw,
            common.peak_extra_memory(fn),
        )  # fmt: skip
        results.append(save(rec))
        del fn
    if "eager" in grads:
        for backend in ("cuda", "triton"):
            if backend in grads:
                err = (grads[backend][rows].float() - grads["eager"][rows].float()).abs().max().item()
                scale = grads["eager"][rows].float().abs().max().item()
                if err > 2e-2 * scale + 1e-6:
                    raise AssertionError(f"{backend} backward: max error {err:.3g} vs eager (scale {scale:.3g})")
    grads.clear()

    # contrastive_logprobs: three bf16 streams
    pos = (torch.randn(n, v, device=DEVICE, generator=g) * 3).to(dtype)
    neg = (torch.randn(n, v, device=DEVICE, generator=g) * 3).to(dtype)
    a_tok = torch.randn(n, device=DEVICE, generator=g)
    sign = torch.sign(a_tok)
    keep = torch.ones(n, dtype=torch.bool, device=DEVICE)
    outs = {}
    for backend in backends:
        if backend == "eager":

            def fn():
                lps = [eager_fwd(x, targets, temperature, False)[0] for x in (logits, pos, neg)]
                c = torch.exp(sign * (lps[1] - lps[2])).clamp(0.8, 1.2)
                return (*lps, c, a_tok * (1 + 0.5 * (c - 1)))
        else:
            launch = launchers(backend).contrastive_logprobs_fwd

            def fn(launch=launch):
                return launch(logits, pos, neg, targets, a_tok, sign, keep, 0.5, 0.2, temperature, -100)

        out = fn()
        check_rows(f"{backend} contrastive pos", out[1], None, pos, targets, temperature, rows)
        outs[backend] = out
        nbytes = 3 * n * v * elem
        rec = case_record(
            "contrastive_logprobs_fwd", backend, n, v, dtype, common.timed(fn), nbytes, copy_bw,
            common.peak_extra_memory(fn), streams=3,
        )  # fmt: skip
        results.append(save(rec))
    if "cuda" in outs and "triton" in outs:
        for i, name in enumerate(("policy", "pos", "neg", "weights", "advantages")):
            common.assert_close(f"cuda vs triton {name}", outs["cuda"][i], outs["triton"][i], atol=1e-5, rtol=1e-5)

    common.print_table(
        results, ["op", "backend", "median_ms", "p20_ms", "p80_ms", "gbps", "floor_ms", "ratio_to_floor"]
    )
    if copy_bw:
        print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s on {common.machine_name()}")
    print(
        "reproduce: "
        + " ".join([os.path.basename(sys.executable), "-m", "bench.bench_cuda_logprobs", *(argv or sys.argv[1:])])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
