"""Ahead-of-time sm_90 compile of every Triton kernel under every named configuration
(``cepo_kernels/configs.py``), with the resource usage ptxas reports: registers per thread, stack
(spills), shared memory. No GPU needed.

``TRITON_INTERPRET=0 python -m tests.kernels.aot_report [--json] [--config v1|v2] [CASE...]``
prints a table (or one JSON line per case) and exits 1 if any kernel spills or fails to compile.
Run it under another Triton by putting that Triton first on ``PYTHONPATH``, e.g. Triton 3.6 (the
GPU image's) without touching the project's venv::

    python -m pip install --no-deps --target /tmp/t36site "triton==3.6.*"
    PYTHONPATH=/tmp/t36site:$PWD TRITON_INTERPRET=0 .venv/bin/python -m tests.kernels.aot_report

Signatures are those of a real launch at Qwen3-1.7B / 151936-vocabulary sizes: bf16 tensors,
16-divisible pointers, sizes and row strides (what Triton specialises at run time).
``tests/kernels/test_aot_report.py`` runs it for the installed Triton.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

# (case id, configuration, module, kernel, pointer dtypes, constexprs, launch options, float scalars)
CASES: list[tuple] = []
# Spills of today's configuration (v1), kept as it shipped so that one GPU run can compare it with
# v2; every other case must compile without spills.
KNOWN_V1_SPILLS = {"linear_fwd-streams3", "linear_matmul_dh-128x128"}


def _case(case_id, config, module, kernel, ptrs, constexprs, options, floats=()):
    CASES.append((case_id, config, module, kernel, ptrs, constexprs, options, tuple(floats)))


def _build_cases() -> None:
    from cepo_kernels import configs

    for cfg_name, cfg in configs.CONFIGS.items():
        tok = {**configs.CONFIGS["v1"]["token_logprobs"], **cfg.get("token_logprobs", {})}
        block = tok["block_bytes"] // 2  # bf16
        warps = tok["num_warps_large"]
        v2 = tok["log2"]
        mod = "cepo_kernels.triton.token_logprobs"
        fwd = "_token_logprobs_fwd_v2_kernel" if v2 else "_token_logprobs_fwd_kernel"
        bwd = "_token_logprobs_bwd_v2_kernel" if v2 else "_token_logprobs_bwd_kernel"
        row_ptrs = {"logits_ptr": "*bf16", "grad_logits_ptr": "*bf16", "targets_ptr": "*i64"}
        scal = ("scale2", "inv_temperature")
        for ent in (False, True):
            _case(f"token_logprobs_fwd-entropy{int(ent)}", cfg_name, mod, fwd, row_ptrs,
                  {"COMPUTE_ENTROPY": ent, "BLOCK_V": block}, {"num_warps": warps}, scal)  # fmt: skip
        for gl, ge in ((True, False), (True, True)):
            meta = {"HAS_GRAD_LOGP": gl, "HAS_GRAD_ENTROPY": ge, "BLOCK_V": block}
            _case(f"token_logprobs_bwd-g{int(gl)}{int(ge)}", cfg_name, mod, bwd, row_ptrs, meta, {"num_warps": warps},
                  scal)  # fmt: skip
        con = "_contrastive_logprobs_v2_kernel" if v2 else "_contrastive_logprobs_kernel"
        _case("contrastive_logprobs-policy1", cfg_name, "cepo_kernels.triton.contrastive_logprobs", con,
              {n: "*bf16" for n in ("policy_ptr", "pos_ptr", "neg_ptr")} | {"targets_ptr": "*i64"},
              {"HAS_POLICY": True, "BLOCK_V": block}, {"num_warps": warps},
              ("scale2", "inv_temperature", "lam", "eps_w"))  # fmt: skip

        tree = {**configs.CONFIGS["v1"]["tree_attention"], **cfg.get("tree_attention", {})}
        qkv = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr")}
        qkv |= {n: "*i32" for n in ("seg_ptr", "depth_ptr", "anc_ptr", "blk_idx_ptr", "blk_full_ptr", "blk_cnt_ptr")}
        mod = "cepo_kernels.triton.tree_attention"
        for d in (64, 128):
            for kind, kernels in (("fwd", ["_tree_attn_fwd_kernel"]),
                                  ("bwd", ["_tree_attn_bwd_dkdv_kernel", "_tree_attn_bwd_dq_kernel"])):  # fmt: skip
                bm, bn, w, st = tree[kind][d]
                for kernel in kernels:
                    name = kernel.replace("_tree_attn_", "").replace("_kernel", "")
                    _case(f"tree_attention_{name}-d{d}-{bm}x{bn}", cfg_name, mod, kernel, qkv,
                          {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": d, "PRECISION": "tf32", "UPCAST": False},
                          {"num_warps": w, "num_stages": st}, ("scale", "scale_log2"))  # fmt: skip
        if cfg_name != "v1":
            _case("tree_attention_bwd_delta-d128", cfg_name, mod, "_tree_attn_bwd_delta_kernel", qkv,
                  {"HAS_DLSE": True, "BLOCK_M": 64, "BLOCK_D": 128}, {"num_warps": 4})  # fmt: skip

        lin = {**configs.CONFIGS["v1"]["linear_logprobs"], **cfg.get("linear_logprobs", {})}
        group = 0 if lin["group_m"] <= 1 else lin["group_m"]
        import torch

        from cepo_kernels.triton import linear_logprobs as L

        c = L.config(torch.bfloat16)
        mod = "cepo_kernels.triton.linear_logprobs"
        opts = {"num_warps": c.num_warps, "num_stages": c.num_stages}
        tiles = {"BLOCK_N": c.block_n, "BLOCK_V": c.block_v, "BLOCK_K": c.block_k, "UPCAST": False,
                 "PRECISION": "tf32"}  # fmt: skip
        lp = {n: "*bf16" for n in ("h0_ptr", "h1_ptr", "h2_ptr", "w_ptr", "h_ptr", "g_ptr")} | {"targets_ptr": "*i64"}
        for ns, ent in ((1, True), (3, False)):
            _case(f"linear_fwd-streams{ns}", cfg_name, mod, "_linear_lse_fwd_kernel", lp,
                  {"NUM_STREAMS": ns, "HAS_BIAS": True, "COMPUTE_ENTROPY": ent, "SPLIT_V": c.split_v, **tiles,
                   "GROUP": group}, opts, ("inv_temperature",))  # fmt: skip
        _case("linear_grad_logits", cfg_name, mod, "_linear_grad_logits_kernel", lp,
              {"HAS_BIAS": True, "HAS_GRAD_LOGP": True, "HAS_GRAD_ENTROPY": True, **tiles, "GROUP": group}, opts,
              ("inv_temperature",))  # fmt: skip
        mm = {"BLOCK_M": c.mm_block, "BLOCK_P": c.mm_block, "BLOCK_K": c.mm_block_k, "UPCAST": False,
              "PRECISION": "tf32", "P_FASTEST": group > 0}  # fmt: skip
        dh_p = min(c.mm_block, lin["dh_block_p"])
        _case(f"linear_matmul_dh-{c.mm_block}x{dh_p}", cfg_name, mod, "_matmul_kernel",
              {"a_ptr": "*bf16", "b_ptr": "*bf16"}, {"ACCUMULATE": True, **mm, "BLOCK_P": dh_p}, opts)  # fmt: skip
        _case("linear_matmul_dw", cfg_name, mod, "_matmul_kernel",
              {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16"}, {"ACCUMULATE": False, **mm}, opts)  # fmt: skip


# integer arguments that are counts or offsets, not 16-divisible at run time
UNALIGNED = ("ignore_index", "N", "T", "M", "P", "rows_inner", "v_lo", "v_hi", "NQ", "NK", "MAXK", "MAXQ", "H", "HK",
             "GROUP")  # fmt: skip


def _signature(fn, ptrs, constexprs, floats):
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            if name not in consts:
                consts[name] = p.default
            continue
        if name.endswith("_ptr"):
            sig[name] = ptrs.get(name, "*fp32")
        elif name in floats:
            sig[name] = "fp32"
        else:  # sizes and strides: i32, as Triton specialises them at these sizes (all < 2^31)
            sig[name] = "i32"
        if sig[name].startswith("*") or (sig[name] != "fp32" and name not in UNALIGNED):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            found[key.lower()] = int(m.group(1))
    return found


def compile_case(case_id, config, module, kernel, ptrs, constexprs, options, floats) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), kernel)
    sig, consts, attrs = _signature(fn, ptrs, constexprs, floats)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(options))  # fmt: skip
    r = {"case": case_id, "config": config, "kernel": kernel, "ok": True, "triton": triton.__version__,
         "options": options, **_usage(compiled.asm["cubin"])}  # fmt: skip
    r["static_shared"] = r.pop("shared", 0)
    r["shared"] = int(compiled.metadata.shared)  # what the launch requests (dynamic shared memory)
    r["spills"] = bool(r.get("stack", 0) or r.get("local", 0))
    return r


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("set TRITON_INTERPRET=0: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--config", action="append", help="only these configurations (default: all)")
    ap.add_argument("--json", action="store_true", help="one JSON line per case instead of a table")
    args = ap.parse_args(argv)
    _build_cases()
    bad = 0
    rows = []
    for c in CASES:
        if (args.cases and c[0] not in args.cases) or (args.config and c[1] not in args.config):
            continue
        try:
            r = compile_case(*c)
        except Exception as exc:  # report and go on
            r = {
                "case": c[0],
                "config": c[1],
                "kernel": c[3],
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}"[:1500],
            }
        r["known_spill"] = r.get("spills", False) and c[1] == "v1" and c[0] in KNOWN_V1_SPILLS
        bad += (not r["ok"]) or (r.get("spills", False) and not r["known_spill"])
        rows.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
    if not args.json:
        import triton

        print(f"sm_90 AOT compile, Triton {triton.__version__}")
        print(f"{'case':40s} {'cfg':4s} {'warps':>5s} {'stg':>3s} {'regs':>5s} {'stack':>6s} {'smem KiB':>9s}  status")
        for r in rows:
            o = r.get("options", {})
            status = (
                "FAIL " + r.get("error", "")[:80]
                if not r["ok"]
                else (("spills (known, v1 as shipped)" if r["known_spill"] else "SPILLS") if r["spills"] else "ok")
            )
            cols = f"{o.get('num_warps', ''):>5} {o.get('num_stages', ''):>3} "
            cols += f"{r.get('reg', ''):>5} {r.get('stack', ''):>6}"
            print(f"{r['case']:40s} {r['config']:4s} {cols} {r.get('shared', 0) / 1024:9.1f}  {status}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
