"""Every Triton kernel compiles for sm_90 (H100 / H200) here, without a GPU, under every named
kernel configuration (v1 and v2), through ``tools/triton_aot.py`` in one subprocess: no register
spills beyond v1's known ones (kept as shipped for the side-by-side GPU run), shared memory within
what a block may use, 16-byte vector loads in the memory-bound row kernels, ``wgmma`` in tree
attention. ``python -m tools.triton_aot`` prints the register / stack / shared-memory table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"v1", "v2"}


@pytest.fixture(scope="module")
def compiled() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tools.triton_aot", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)  # fmt: skip
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if not rows:
        pytest.fail(f"the AOT compile produced nothing (rc={proc.returncode}): {proc.stderr[-3000:]}")
    return {(r["config"], r["case"]): r for r in rows}


def _cases(prefixes=("",)):
    sys.path.insert(0, str(ROOT))
    from tools.triton_aot import cases

    return [pytest.param(c.config, c.case, id=f"{c.config}-{c.case}") for c in cases() if c.case.startswith(prefixes)]


def test_every_configuration_is_compiled(compiled):
    assert {cfg for cfg, _ in compiled} == CONFIGS | {"-"}


@pytest.mark.parametrize("config,case_id", _cases())
def test_triton_kernel_compiles_for_sm90(compiled, config, case_id):
    r = compiled.get((config, case_id))
    assert r is not None, f"{config}/{case_id} was not compiled"
    assert r["ok"], r.get("error")
    assert r["cubin_bytes"] > 0
    assert not r["spills"] or r["known_spill"], f"{config}/{case_id}: {r.get('stack')} B of stack (register spills)"
    assert r["shared"] <= 227 * 1024, f"{config}/{case_id}: {r['shared']} B of shared memory"


@pytest.mark.parametrize("config,case_id", _cases(("token_logprobs", "contrastive_logprobs")))
def test_triton_logits_kernels_use_16_byte_loads(compiled, config, case_id):
    r = compiled[(config, case_id)]
    assert r["ok"], r.get("error")
    assert r["vector_loads"], f"{config}/{case_id}: no 16-byte vector loads in the PTX"


TREE_MATMUL_KERNELS = ("tree_attention_fwd", "tree_attention_bwd_dkdv", "tree_attention_bwd_dq")


@pytest.mark.parametrize("config,case_id", _cases(TREE_MATMUL_KERNELS))
def test_tree_attention_kernels_use_wgmma_and_16_byte_loads(compiled, config, case_id):
    r = compiled[(config, case_id)]
    assert r["ok"], r.get("error")
    assert r["vector_loads"] and r["wgmma"], f"{config}/{case_id}: vector loads {r['vector_loads']}, wgmma {r['wgmma']}"
