"""Checkpoints that a crash mid-write cannot corrupt.

Layout of ``<output_dir>/checkpoints/``::

    step-000010/        a complete checkpoint
        ds/             DeepSpeed state: model, optimizer (ZeRO shards), LR scheduler
        hf/             the policy as a Hugging Face directory (or LoRA adapter) + tokenizer
        rng-rank<r>.pt  each rank's Python / NumPy / torch RNG states
        meta.json       step, data position, metrics totals; written last = "complete"
    latest              the name of the newest complete checkpoint (replaced atomically)

A checkpoint is written into ``.tmp-step-XXXXXX`` and renamed when complete; ``latest`` is then
replaced with ``os.replace``. A crash at any point leaves the previous checkpoint and ``latest``
intact. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

META = "meta.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_hf(engine, tokenizer, out: str) -> None:
    """The policy (full model, or LoRA adapter) as a Hugging Face directory; called on every rank."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers the shards to rank 0
    else:
        state = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        if state is not None:
            module.save_pretrained(out, state_dict=state)
        else:
            module.save_pretrained(out)
        tokenizer.save_pretrained(out)


def save(engine, tokenizer, ckpt_root: str, step: int, meta: dict, keep: int = 2) -> str:
    """Write checkpoint ``step`` under ``ckpt_root`` (all ranks call this); returns its path."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    name = f"step-{step:06d}"
    tmp, final = os.path.join(ckpt_root, f".tmp-{name}"), os.path.join(ckpt_root, name)
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crash
        os.makedirs(tmp)
    _barrier()
    engine.save_checkpoint(tmp, tag="ds", client_state={"step": step}, save_latest=False)
    save_hf(engine, tokenizer, os.path.join(tmp, "hf"))
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{rank}.pt"))
    _barrier()
    if rank == 0:
        _write_atomic(os.path.join(tmp, META), json.dumps({**meta, "step": step}, indent=1))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(os.path.join(ckpt_root, "latest"), name)
        for old in list_complete(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    _barrier()
    return final


def list_complete(ckpt_root: str) -> list[str]:
    """Names of complete checkpoints (those with ``meta.json``), oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    names = [
        n for n in os.listdir(ckpt_root) if n.startswith("step-") and os.path.isfile(os.path.join(ckpt_root, n, META))
    ]
    return sorted(names)


def latest(ckpt_root: str) -> str | None:
    """Path of the newest complete checkpoint: the one ``latest`` names, else the newest complete one."""
    pointer = os.path.join(ckpt_root, "latest")
    if os.path.isfile(pointer):
        name = open(pointer).read().strip()
        if os.path.isfile(os.path.join(ckpt_root, name, META)):
            return os.path.join(ckpt_root, name)
    names = list_complete(ckpt_root)
    return os.path.join(ckpt_root, names[-1]) if names else None


def load(engine, path: str) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path``; returns its meta dict."""
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    load_path, _ = engine.load_checkpoint(path, tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}/ds")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = os.path.join(path, f"rng-rank{rank}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta
