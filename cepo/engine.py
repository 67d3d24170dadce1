"""DeepSpeed set-up: process group, model (optionally LoRA), optimizer, LR schedule, engine.

- ``deepspeed.initialize`` with ZeRO stage 0-3, bf16 or fp32, gradient accumulation and clipping.
- The optimizer is AdamW that skips (and counts) a step whose gradients are not all finite; the
  decision is all-reduced so every rank skips together. Under bf16 with ZeRO, DeepSpeed's own
  overflow check skips first; both counts are reported as ``skipped_steps``.
- LR: linear warm-up over ``warmup_steps`` optimizer steps, then cosine to ``lr * min_lr_ratio``.
- On a machine without CUDA: ``DS_ACCELERATOR=cpu`` and the gloo backend; a single process needs no
  launcher (the rendezvous variables are filled in).
"""

from __future__ import annotations

import datetime
import math
import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedSetupError(RuntimeError):
    """The process group could not be formed (a rank missing, the master unreachable) within the
    timeout; the message names the rendezvous, the world size and what to check."""


DEFAULT_DIST_TIMEOUT_S = 1800.0  # torch's own default: long enough for rank 0 to write a large checkpoint


def launcher_env() -> str:
    """Fill in the rendezvous variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``) for the launchers that do not set them; returns the launcher's name.

    - ``torchrun`` and the ``deepspeed`` launcher set all five: ``"torchrun/deepspeed"``.
    - ``srun`` with several tasks (one per GPU) sets ``SLURM_PROCID`` / ``SLURM_LOCALID`` /
      ``SLURM_STEP_NUM_TASKS``; ``MASTER_ADDR`` and ``MASTER_PORT`` must come from the batch script
      (``examples/slurm/``): ``"srun"``.
    - a plain ``cepo train`` / ``python`` process is a world of one on a free local port: ``"single"``.
    """
    env = os.environ
    if "RANK" in env:
        return "torchrun/deepspeed"
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "SLURM_PROCID" in env and tasks > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ValueError(
                f"launched by srun with {tasks} tasks but {' and '.join(missing)} not set: export MASTER_ADDR "
                "(the first node's hostname) and MASTER_PORT in the batch script (see examples/slurm/)"
            )
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(tasks), LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        return "srun"
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    return "single"


def _rendezvous_error(exc: Exception, timeout_s: float) -> DistributedSetupError:
    """A one-line explanation of a failed ``init_process_group``."""
    env = os.environ
    where = f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
    rank, world = env.get("RANK"), env.get("WORLD_SIZE")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if rank == "0":
        what = (
            f"rank 0 waited {timeout_s:g} s at {where} for WORLD_SIZE={world} processes and not all joined: check "
            "that every node was started with the same --nnodes / --nproc_per_node (or srun --ntasks), and that "
            "the other nodes can reach this one"
        )
    else:
        what = (
            f"rank {rank} of WORLD_SIZE={world} could not join the rendezvous at {where} within {timeout_s:g} s: "
            "check MASTER_ADDR / MASTER_PORT (the rank-0 node's address, reachable from this node) and that "
            "rank 0 is running"
        )
    return DistributedSetupError(f"{what} (engine.dist_timeout_s; torch: {first})")


def setup_distributed(dist_backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed; returns ``(rank, world_size, device)``.

    ``timeout_s`` (``engine.dist_timeout_s``; default 1800) bounds the rendezvous and every later
    collective (gloo / NCCL): a missing rank, an unreachable master or a dead peer ends in an error
    instead of a hang. A failed rendezvous raises :class:`DistributedSetupError` naming the master,
    the world size and what to check.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    timeout_s = DEFAULT_DIST_TIMEOUT_S if timeout_s is None else float(timeout_s)
    if not timeout_s > 0:
        raise ValueError(f"engine.dist_timeout_s: expected > 0 seconds, got {timeout_s!r}")
    launcher = launcher_env()
    own_port = launcher == "single" and "MASTER_PORT" not in os.environ
    if own_port:
        os.environ["MASTER_PORT"] = str(_free_port())
    import deepspeed
    from deepspeed.utils import groups as ds_groups

    if not torch.distributed.is_initialized():
        # DeepSpeed keeps a clone of the world group from the last process group; a process that
        # trains again after `cepo` destroyed its group (cli.main twice, a test session) would
        # broadcast over that dead clone
        ds_groups._WORLD_GROUP = None
    backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    for attempt in range(5):
        if torch.distributed.is_initialized():
            break
        try:
            deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        except torch.distributed.DistNetworkError as exc:
            # the port we picked was taken by another process before we bound it: pick another
            if own_port and attempt < 4:
                os.environ["MASTER_PORT"] = str(_free_port())
                continue
            raise _rendezvous_error(exc, timeout_s) from exc
        except torch.distributed.DistError as exc:  # DistStoreError: timed out waiting for the other ranks
            raise _rendezvous_error(exc, timeout_s) from exc
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if torch.cuda.is_available():
        # srun binding one GPU per task leaves each task a single visible device: device 0
        local = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def load_policy(cfg, *, for_training: bool = True):
    """The HF causal LM at ``cfg.model.path`` (fp32 weights; DeepSpeed casts for bf16), LoRA-wrapped if asked."""
    from transformers import AutoModelForCausalLM

    mcfg = cfg.model
    if not os.path.isdir(mcfg.path):
        raise FileNotFoundError(f"model directory not found: {mcfg.path}")
    from cepo import vision

    is_vl = vision.is_vl_dir(mcfg.path)
    if is_vl:  # Qwen2.5-VL / Qwen3-VL: AutoModelForImageTextToText, the vision tower frozen by default
        model = vision.load_vl_model(mcfg.path, attn_implementation=mcfg.attn_implementation)
        if getattr(mcfg, "freeze_vision", True):
            vision.freeze_vision(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            mcfg.path, dtype=torch.float32, attn_implementation=mcfg.attn_implementation
        )
    if mcfg.gradient_checkpointing and for_training:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if mcfg.lora and for_training:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=mcfg.lora_r,
            lora_alpha=mcfg.lora_alpha,
            lora_dropout=mcfg.lora_dropout,
            # never on the vision tower
            target_modules=vision.lora_targets_outside_vision(list(mcfg.lora_target_modules))
            if is_vl
            else list(mcfg.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    return model


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW whose ``step`` does nothing (and counts it) if any gradient is NaN or inf.

    ``overflow`` is set for DeepSpeed, which then also skips the LR scheduler step.
    """

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.skipped = 0
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        bad = torch.zeros((), dtype=torch.float32)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    bad.fill_(1.0)
        if torch.distributed.is_initialized():
            bad = bad.to(_comm_device())
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        self.overflow = bool(bad.item())
        if self.overflow:
            self.skipped += 1
            return None
        return super().step(closure)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Multiplier of the base LR at optimizer step ``s`` (0-based): linear warm-up, then cosine."""

    def f(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        p = min(1.0, (s - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))

    return f


def ds_config(cfg, grad_accum: int) -> dict:
    """The DeepSpeed config dict for this run."""
    zero = {"stage": cfg.engine.zero_stage}
    if cfg.engine.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    pin = torch.cuda.is_available()  # pinned host memory speeds up the copies to and from a GPU
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if cfg.engine.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        # with offload, keep our AdamW (skips non-finite steps) on the CPU tensors instead of
        # requiring DeepSpeed's compiled DeepSpeedCPUAdam
        "zero_force_ds_cpu_optimizer": False,
        "train_micro_batch_size_per_gpu": cfg.optim.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model, cfg, *, total_optimizer_steps: int, grad_accum: int):
    """``(engine, optimizer)`` from ``deepspeed.initialize``; ``optimizer`` is our AdamW."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = SkipNonFiniteAdamW(
        params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, total_optimizer_steps, cfg.optim.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg, grad_accum)
    )
    return engine, optimizer


def skipped_steps(engine, optimizer: SkipNonFiniteAdamW) -> int:
    """Optimizer steps skipped for non-finite gradients, by DeepSpeed or by our AdamW."""
    if engine.optimizer is optimizer:  # DeepSpeed read our `overflow` flag and counted it itself
        return engine.skipped_steps
    return engine.skipped_steps + optimizer.skipped


def unwrap(engine):
    """The HF (or peft) model inside the engine."""
    return engine.module
