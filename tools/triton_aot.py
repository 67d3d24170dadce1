"""Ahead-of-time sm_90 (H100 / H200) compile of every Triton kernel under every named kernel
configuration (``cepo_kernels/configs.py``), with what the compiler and ptxas report: cubin size,
16-byte vector loads and ``wgmma`` in the PTX, registers per thread, stack (spills) and shared
memory. No GPU and no driver needed: ``triton.compile`` with ``GPUTarget("cuda", 90, 32)``.

The interpreter that runs the numeric tests on CPU is more permissive than the compiler, so this
catches kernels that would only fail on the GPU. Signatures are those of a real launch at
Qwen3-1.7B / 151936-vocabulary sizes: bf16 tensors (the row kernels also fp16 and fp32), pointers,
sizes and row strides divisible by 16 (what Triton specialises at run time), so the PTX shows
whether the hot loads are 16-byte vectors.

``TRITON_INTERPRET=0 python -m tools.triton_aot [--json] [--config v1|v2] [CASE...]`` prints a
table (or one JSON line per case) and exits 1 if a kernel fails to compile or spills (beyond v1's
known spills, kept as they shipped so that one GPU run compares v1 with v2).
``tests/kernels/test_triton_compile.py`` runs it for the installed Triton. Under another Triton,
put it first on ``PYTHONPATH`` (e.g. Triton 3.6, the GPU image's)::

    python -m pip install --no-deps --target /tmp/t36site "triton==3.6.*"
    PYTHONPATH=/tmp/t36site:$PWD TRITON_INTERPRET=0 .venv/bin/python -m tools.triton_aot
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
from dataclasses import dataclass, field

# Spills of v1 as it shipped; every other case must compile without spills.
KNOWN_V1_SPILLS = {"linear_fwd-streams3", "linear_matmul_dh-128x128"}
# integer arguments that are counts or offsets, not 16-divisible at run time
UNALIGNED = {"ignore_index", "N", "T", "M", "P", "rows_inner", "v_lo", "v_hi", "NQ", "NK", "MAXK", "MAXQ", "H", "HK",
             "GROUP", "n_splits", "pos_base", "neg_base"}  # fmt: skip
FLOATS = {"scale", "scale_log2", "inv_temperature", "lam", "eps_w"}
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90


@dataclass
class Case:
    case: str  # id, unique within a configuration
    config: str  # "v1", "v2", or "-" for kernels no configuration touches
    module: str
    kernel: str
    ptrs: dict  # pointer argument -> Triton type; others "*fp32"
    constexprs: dict
    options: dict = field(default_factory=dict)  # num_warps, num_stages


def cases() -> list[Case]:
    import torch

    from cepo_kernels import configs
    from cepo_kernels.triton import linear_logprobs as L

    out: list[Case] = []
    row_mod = "cepo_kernels.triton."
    out.append(Case("contrastive_advantage", "-", row_mod + "contrastive_advantage", "_contrastive_advantage_kernel",
                    {"keep_ptr": "*i8"}, {"HAS_MASK": True, "BLOCK": 1024}, {"num_warps": 4}))  # fmt: skip
    for name in configs.CONFIGS:
        tok = configs.get("token_logprobs", name)
        log2, warps = tok["log2"], {"num_warps": tok["num_warps_large"]}
        for dt, size in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
            block = tok["block_bytes"] // size
            rows = {"logits_ptr": f"*{dt}", "grad_logits_ptr": f"*{dt}", "targets_ptr": "*i64"}
            for ent in (False, True):
                out.append(Case(f"token_logprobs_fwd-{dt}-entropy{int(ent)}", name, row_mod + "token_logprobs",
                                "_token_logprobs_fwd_kernel", rows,
                                {"COMPUTE_ENTROPY": ent, "LOG2": log2, "BLOCK_V": block}, warps))  # fmt: skip
            for gl, ge in ((True, False), (True, True), (False, True)):
                out.append(Case(f"token_logprobs_bwd-{dt}-g{int(gl)}{int(ge)}", name, row_mod + "token_logprobs",
                                "_token_logprobs_bwd_kernel", rows,
                                {"HAS_GRAD_LOGP": gl, "HAS_GRAD_ENTROPY": ge, "LOG2": log2, "BLOCK_V": block},
                                warps))  # fmt: skip
        for has_policy in (True, False):
            out.append(Case(f"contrastive_logprobs-bf16-policy{int(has_policy)}", name,
                            row_mod + "contrastive_logprobs", "_contrastive_logprobs_kernel",
                            {n: "*bf16" for n in ("policy_ptr", "pos_ptr", "neg_ptr")} | {"targets_ptr": "*i64"},
                            {"HAS_POLICY": has_policy, "LOG2": log2, "BLOCK_V": tok["block_bytes"] // 2},
                            warps))  # fmt: skip

        tree = configs.get("tree_attention", name)
        qkv = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr")}
        qkv |= {n: "*i32" for n in ("seg_ptr", "depth_ptr", "anc_ptr", "blk_idx_ptr", "blk_full_ptr", "blk_cnt_ptr")}
        for d in (64, 128):
            for kind, kernels in (("fwd", ["_tree_attn_fwd_kernel"]),
                                  ("bwd", ["_tree_attn_bwd_dkdv_kernel", "_tree_attn_bwd_dq_kernel"])):  # fmt: skip
                bm, bn, w, st = tree[kind][d]
                for kernel in kernels:
                    short = kernel.replace("_tree_attn_", "").replace("_kernel", "")
                    out.append(Case(f"tree_attention_{short}-d{d}-{bm}x{bn}", name, row_mod + "tree_attention",
                                    kernel, qkv,
                                    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": d, "PRECISION": "tf32", "UPCAST": False},
                                    {"num_warps": w, "num_stages": st}))  # fmt: skip
        if tree["delta_kernel"]:
            out.append(Case("tree_attention_bwd_delta-d128", name, row_mod + "tree_attention",
                            "_tree_attn_bwd_delta_kernel", qkv, {"HAS_DLSE": True, "BLOCK_M": 64, "BLOCK_D": 128},
                            {"num_warps": 4}))  # fmt: skip

        lin = configs.get("linear_logprobs", name)
        group = 0 if lin["group_m"] <= 1 else lin["group_m"]
        c = L.config(torch.bfloat16, interpreter=False)
        mod = row_mod + "linear_logprobs"
        opts = {"num_warps": c.num_warps, "num_stages": c.num_stages}
        tiles = {"BLOCK_N": c.block_n, "BLOCK_V": c.block_v, "BLOCK_K": c.block_k, "UPCAST": False,
                 "PRECISION": "tf32"}  # fmt: skip
        lp = {n: "*bf16" for n in ("h0_ptr", "h1_ptr", "h2_ptr", "w_ptr", "h_ptr", "g_ptr")} | {"targets_ptr": "*i64"}
        for ns, ent in ((1, True), (3, False)):
            out.append(Case(f"linear_fwd-streams{ns}", name, mod, "_linear_lse_fwd_kernel", lp,
                            {"NUM_STREAMS": ns, "HAS_BIAS": True, "COMPUTE_ENTROPY": ent, "SPLIT_V": c.split_v,
                             **tiles, "GROUP": group}, opts))  # fmt: skip
        out.append(Case("linear_grad_logits", name, mod, "_linear_grad_logits_kernel", lp,
                        {"HAS_BIAS": True, "HAS_GRAD_LOGP": True, "HAS_GRAD_ENTROPY": True, **tiles, "GROUP": group},
                        opts))  # fmt: skip
        mm = {"BLOCK_M": c.mm_block, "BLOCK_P": c.mm_block, "BLOCK_K": c.mm_block_k, "UPCAST": False,
              "PRECISION": "tf32", "P_FASTEST": group > 0}  # fmt: skip
        dh_p = min(c.mm_block, lin["dh_block_p"])
        ab = {"a_ptr": "*bf16", "b_ptr": "*bf16"}
        out.append(Case(f"linear_matmul_dh-{c.mm_block}x{dh_p}", name, mod, "_matmul_kernel", ab,
                        {"ACCUMULATE": True, **mm, "BLOCK_P": dh_p}, opts))  # fmt: skip
        out.append(Case("linear_matmul_dw", name, mod, "_matmul_kernel", ab | {"c_ptr": "*bf16"},
                        {"ACCUMULATE": False, **mm}, opts))  # fmt: skip
        if name == configs.DEFAULT:  # the combine kernels take no configuration
            out.append(Case("linear_combine", "-", mod, "_linear_logprobs_combine_kernel", {"targets_ptr": "*i64"},
                            {"COMPUTE_ENTROPY": True, "BLOCK": L.COMBINE_BLOCK}, {"num_warps": 4}))  # fmt: skip
            out.append(Case("linear_contrastive_combine", "-", mod, "_linear_contrastive_combine_kernel",
                            {"targets_ptr": "*i64"}, {"HAS_POLICY": True, "FIRST": 1, "BLOCK": L.COMBINE_BLOCK},
                            {"num_warps": 4}))  # fmt: skip
    return out


def _signature(fn, case: Case):
    """Triton signature, constexprs and 16-divisibility attributes of a launch at real sizes."""
    sig, attrs, consts = {}, {}, dict(case.constexprs)
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            consts.setdefault(name, p.default)
            continue
        if name.endswith("_ptr"):
            sig[name] = case.ptrs.get(name, "*fp32")
        elif name in FLOATS:
            sig[name] = "fp32"
        else:  # sizes and strides: i32, as Triton specialises them at these sizes (all < 2^31)
            sig[name] = "i32"
        if sig[name].startswith("*") or (sig[name] == "i32" and name not in UNALIGNED):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _usage(cubin: bytes) -> dict:
    """ptxas resource usage from the cubin (``cuobjdump`` ships with Triton's NVIDIA backend)."""
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


def compile_case(case: Case) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(case.module), case.kernel)
    sig, consts, attrs = _signature(fn, case)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(case.options))  # fmt: skip
    ptx = compiled.asm["ptx"]
    r = {"case": case.case, "config": case.config, "kernel": case.kernel, "ok": True, "triton": triton.__version__,
         "options": case.options, "cubin_bytes": len(compiled.asm["cubin"]),
         "vector_loads": bool(re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx)), "wgmma": "wgmma.mma_async" in ptx,
         **_usage(compiled.asm["cubin"])}  # fmt: skip
    r["static_shared"] = r.pop("shared", 0)
    r["shared"] = int(compiled.metadata.shared)  # what the launch requests (dynamic shared memory)
    r["spills"] = bool(r.get("stack", 0) or r.get("local", 0))
    return r


def run_case(case: Case) -> dict:
    try:
        r = compile_case(case)
    except Exception as exc:  # report and go on: the test names the failing kernel
        r = {"case": case.case, "config": case.config, "kernel": case.kernel, "ok": False,
             "error": f"{type(exc).__name__}: {exc}"[:2000]}  # fmt: skip
    r["known_spill"] = bool(r.get("spills")) and case.config == "v1" and case.case in KNOWN_V1_SPILLS
    return r


def _status(r: dict) -> str:
    if not r["ok"]:
        return "FAIL " + r.get("error", "")[:80]
    if r["spills"]:
        return "spills (known, v1 as shipped)" if r["known_spill"] else "SPILLS"
    return "ok" if r["shared"] <= SHARED_LIMIT else "SHARED MEMORY"


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("set TRITON_INTERPRET=0: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", help="only these case ids")
    ap.add_argument("--config", action="append", help="only these configurations (default: all)")
    ap.add_argument("--json", action="store_true", help="one JSON line per case instead of a table")
    args = ap.parse_args(argv)
    rows = []
    for case in cases():
        if (args.cases and case.case not in args.cases) or (args.config and case.config not in args.config + ["-"]):
            continue
        r = run_case(case)
        rows.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
    if not args.json:
        import triton

        print(f"sm_90 AOT compile, Triton {triton.__version__}")
        print(f"{'case':40s} {'cfg':4s} {'warps':>5s} {'stg':>3s} {'regs':>5s} {'stack':>6s} {'smem KiB':>9s}  status")
        for r in rows:
            o = r.get("options", {})
            cols = f"{o.get('num_warps', ''):>5} {o.get('num_stages', ''):>3} "
            cols += f"{r.get('reg', ''):>5} {r.get('stack', ''):>6}"
            print(f"{r['case']:40s} {r['config']:4s} {cols} {r.get('shared', 0) / 1024:9.1f}  {_status(r)}")
    return 1 if any(_status(r) not in ("ok", "spills (known, v1 as shipped)") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
