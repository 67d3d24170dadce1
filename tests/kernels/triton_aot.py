"""Compile Triton kernels ahead of time for an H100 (sm_90) on a machine with no GPU.

Triton's compiler needs no driver: ``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` lowers a
kernel to PTX and a cubin. The interpreter that runs the numeric tests on CPU is more permissive
than the compiler, so this catches kernels that would only fail on the GPU. Pointer and integer
arguments listed as aligned get Triton's divisible-by-16 specialisation, as they would at run
time for real shapes (V = 151936), so the PTX shows whether the hot loads are 16-byte vectors.

Run as ``TRITON_INTERPRET=0 python -m tests.kernels.triton_aot`` (prints one JSON line per case);
``tests/kernels/test_triton_compile.py`` does that in a subprocess.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys

# (case id, module, kernel, signature, constexprs, aligned args, options)
CASES: list[tuple] = []


def case(case_id, module, kernel, signature, constexprs, aligned, **options):
    CASES.append((case_id, module, kernel, signature, constexprs, aligned, options))


_LOGPROB_FWD = {
    "logits_ptr": "*bf16", "targets_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32",
    "V": "i32", "stride_logits_row": "i64", "rows_inner": "i32", "stride_logits_outer": "i64",
    "inv_temperature": "fp32", "ignore_index": "i32", "COMPUTE_ENTROPY": "constexpr", "BLOCK_V": "constexpr",
}  # fmt: skip
_LOGPROB_BWD = {
    "logits_ptr": "*bf16", "targets_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
    "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "grad_logits_ptr": "*bf16",
    "V": "i32", "stride_logits_row": "i64", "rows_inner": "i32", "stride_logits_outer": "i64",
    "stride_grad_row": "i64", "inv_temperature": "fp32",
    "ignore_index": "i32", "HAS_GRAD_LOGP": "constexpr", "HAS_GRAD_ENTROPY": "constexpr", "BLOCK_V": "constexpr",
}  # fmt: skip
_CONTRASTIVE = {
    "policy_ptr": "*bf16", "pos_ptr": "*bf16", "neg_ptr": "*bf16", "targets_ptr": "*i64", "adv_ptr": "*fp32",
    "sign_ptr": "*fp32", "out_policy_ptr": "*fp32", "out_pos_ptr": "*fp32", "out_neg_ptr": "*fp32",
    "out_weight_ptr": "*fp32", "out_adv_ptr": "*fp32", "V": "i32", "stride_policy_row": "i64",
    "stride_pos_row": "i64", "stride_neg_row": "i64", "inv_temperature": "fp32", "ignore_index": "i32",
    "lam": "fp32", "eps_w": "fp32", "HAS_POLICY": "constexpr", "BLOCK_V": "constexpr",
}  # fmt: skip
_ADVANTAGE = {
    "adv_ptr": "*fp32", "sign_ptr": "*fp32", "pos_ptr": "*fp32", "neg_ptr": "*fp32", "keep_ptr": "*i8",
    "weight_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "lam": "fp32", "eps_w": "fp32",
    "HAS_MASK": "constexpr", "BLOCK": "constexpr",
}  # fmt: skip


def _with(sig, **dtypes):
    return {k: dtypes.get(k, v) for k, v in sig.items()}


_ROWS = ["logits_ptr", "V", "stride_logits_row", "stride_logits_outer"]
for dt in ("bf16", "fp16", "fp32"):
    block = 16384 // {"bf16": 2, "fp16": 2, "fp32": 4}[dt]
    for ent in (False, True):
        case(f"token_logprobs_fwd-{dt}-entropy{int(ent)}", "cepo_kernels.triton.token_logprobs",
             "_token_logprobs_fwd_kernel", _with(_LOGPROB_FWD, logits_ptr=f"*{dt}"),
             {"COMPUTE_ENTROPY": ent, "BLOCK_V": block}, _ROWS, num_warps=8)  # fmt: skip
    for gl, ge in ((True, False), (True, True), (False, True)):
        case(f"token_logprobs_bwd-{dt}-g{int(gl)}{int(ge)}", "cepo_kernels.triton.token_logprobs",
             "_token_logprobs_bwd_kernel", _with(_LOGPROB_BWD, logits_ptr=f"*{dt}", grad_logits_ptr=f"*{dt}"),
             {"HAS_GRAD_LOGP": gl, "HAS_GRAD_ENTROPY": ge, "BLOCK_V": block},
             _ROWS + ["grad_logits_ptr", "stride_grad_row"], num_warps=8)  # fmt: skip
for has_policy in (True, False):
    case(f"contrastive_logprobs-bf16-policy{int(has_policy)}", "cepo_kernels.triton.contrastive_logprobs",
         "_contrastive_logprobs_kernel", _CONTRASTIVE, {"HAS_POLICY": has_policy, "BLOCK_V": 8192},
         ["policy_ptr", "pos_ptr", "neg_ptr", "V", "stride_policy_row", "stride_pos_row", "stride_neg_row"],
         num_warps=8)  # fmt: skip
case("contrastive_advantage", "cepo_kernels.triton.contrastive_advantage", "_contrastive_advantage_kernel",
     _ADVANTAGE, {"HAS_MASK": True, "BLOCK": 1024}, ["adv_ptr", "sign_ptr", "pos_ptr", "neg_ptr", "N"],
     num_warps=4)  # fmt: skip


def compile_case(case_id, module, kernel, signature, constexprs, aligned, options) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), kernel)
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    return {
        "case": case_id,
        "ok": True,
        "cubin_bytes": len(compiled.asm["cubin"]),
        "vector_loads": bool(re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx)),
        "loads": sorted(set(re.findall(r"ld\.global[\.\w]*", ptx))),
    }


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("set TRITON_INTERPRET=0: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    wanted = set(argv)
    for c in CASES:
        if wanted and c[0] not in wanted:
            continue
        try:
            result = compile_case(*c)
        except Exception as exc:  # report and go on: the test names the failing kernel
            result = {"case": c[0], "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
