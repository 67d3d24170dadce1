"""``cepo export``: a Hugging Face model directory from a run, a checkpoint or an ``hf/`` directory."""

from __future__ import annotations

import os
import shutil

from cepo import checkpoint as ckpt


def find_hf_dir(src: str) -> str:
    """The HF directory inside ``src``: a run dir (newest checkpoint, else ``final/``), a checkpoint, or itself."""
    candidates = []
    if os.path.isdir(os.path.join(src, "checkpoints")):
        latest = ckpt.latest(os.path.join(src, "checkpoints"))
        if latest:
            candidates.append(os.path.join(latest, "hf"))
    candidates += [os.path.join(src, "hf"), os.path.join(src, "final"), src]
    for c in candidates:
        if os.path.isfile(os.path.join(c, "config.json")) or os.path.isfile(os.path.join(c, "adapter_config.json")):
            return c
    raise FileNotFoundError(f"no Hugging Face model or adapter found in {src} (looked at {candidates})")


def export_model(src: str, out: str, *, merge_lora: bool = False) -> str:
    """Write the policy in ``src`` to ``out`` as a HF directory; LoRA adapters merged if ``merge_lora``."""
    hf = find_hf_dir(src)
    if os.path.abspath(hf) == os.path.abspath(out):
        raise ValueError(f"export: output {out} is the source directory")
    is_adapter = os.path.isfile(os.path.join(hf, "adapter_config.json"))
    if is_adapter and merge_lora:
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        model = AutoPeftModelForCausalLM.from_pretrained(hf).merge_and_unload()
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(hf).save_pretrained(out)
    else:
        shutil.copytree(hf, out, dirs_exist_ok=True)
    return out
