"""Typed configuration: one dataclass per concern, loaded with OmegaConf structured configs.

``load_config(path, overrides)`` merges, in order: the dataclass defaults, the YAML file and
dotted ``key=value`` overrides (``rollout.group_size=8``). A key that no dataclass declares is an
error naming the key; a missing file is an error naming the path; bad values are ``ValueError``s
naming the field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError


@dataclass
class ModelConfig:
    path: str = "???"  # any transformers causal-LM directory (required)
    tokenizer: str | None = None  # defaults to `path`
    dtype: str = "fp32"  # weights for `cepo eval` ("fp32"/"bf16"); training precision is engine.precision
    attn_implementation: str = "sdpa"  # "sdpa" or "eager"; both run on CPU and GPU
    gradient_checkpointing: bool = False  # trades compute for memory on large models
    lora: bool = False  # train LoRA adapters (peft) instead of all weights
    lora_r: int = 16  # adapter rank: small ranks suffice for RL updates
    lora_alpha: int = 32  # scale = alpha / r, the usual 2x
    lora_dropout: float = 0.0  # dropout changes log-probs between passes: off for RL
    freeze_vision: bool = True  # VL models: the vision tower is not trained (LoRA never targets it)
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # every linear layer of a Qwen/Llama block


@dataclass
class DataConfig:
    train_file: str = "???"  # local .jsonl / .json / .parquet / .csv (required)
    eval_file: str | None = None  # held-out split; None disables evaluation
    question_field: str = "question"  # column holding the problem text
    answer_field: str = "answer"  # column holding the ground-truth final answer
    instruction: str = "Put the final answer in \\boxed{}."  # appended to each question
    system_prompt: str | None = None  # optional system message for the chat template
    max_prompt_tokens: int = 512  # longer prompts are dropped (and counted), not truncated
    eval_limit: int | None = None  # evaluate on the first N held-out rows (None: all)
    image_field: str = "images"  # VL models: column of each row's images (EasyR1: paths, PNG/JPEG bytes)
    min_pixels: int = 262144  # VL models: images are resized onto the patch grid with at least this area
    max_pixels: int = 4194304  # ... and at most this area (EasyR1 / the reference code's defaults)


@dataclass
class RolloutConfig:
    backend: str = "hf"  # "hf" (transformers generate) or "vllm" (a colocated vLLM engine; extra `vllm`)
    prompts_per_step: int = 8  # prompts per RL step, all ranks together
    group_size: int = 8  # G rollouts per prompt (GRPO group)
    temperature: float = 1.0  # sampling temperature; log-probs use the same temperature
    top_p: float = 1.0  # nucleus sampling; 1.0 keeps the policy's distribution exact
    max_new_tokens: int = 512  # response budget; a truncated response usually scores 0
    generation_batch_size: int = 64  # sequences per generate call (memory bound); vLLM: max_num_seqs
    vllm_memory: float | None = None  # vLLM: KV cache in GiB on the CPU, fraction of GPU memory on a GPU (0.3)
    vllm_threads: int | None = None  # vLLM on the CPU: torch threads while it samples; None: the trainer's
    tis_cap: float | None = None  # vLLM: truncated importance sampling, loss x min(exp(old - vllm), C); None: off


@dataclass
class RewardConfig:
    math_verify: bool = True  # 1 if the last \boxed{} answer equals the ground truth (math-verify)
    format_weight: float = 0.0  # added when the response has a \boxed{} answer; 0 disables it
    functions: list[str] = field(default_factory=list)  # extra "module:function" or "file.py:function"
    timeout_s: float = 5.0  # a reward function that runs longer scores 0 (and is counted)


@dataclass
class AlgorithmConfig:
    name: str = "cepo"  # "grpo", "rlsd" or "cepo"
    scale_by_std: bool = True  # GRPO: divide centred rewards by the group std
    lam: float = 1.0  # initial weight of the teacher term (lam=0 is GRPO)
    lam_schedule: str = "linear"  # "linear", "cosine" or "constant" decay of lam
    lam_decay_steps: int = 0  # T: lam reaches 0 at step T+1; 0 keeps lam constant forever
    eps_w: float = 0.2  # token weight clipped to [1-eps_w, 1+eps_w]
    reject_threshold: float = 0.5  # a rollout with reward below this is "rejected"
    no_rejected: str = "rlsd"  # group without a rejected rollout: "rlsd" (paper) or "grpo" (reference code)
    teacher_template: str = "\nReference answer: {answer}\n"  # inserted after the prompt for teacher passes
    teacher_image: str = "keep"  # VL models: "keep" (teachers see the image) or "drop" (the reference code's teacher)


@dataclass
class OptimConfig:
    lr: float = 1e-6  # RL updates on pretrained models need small steps
    weight_decay: float = 0.0  # no decay: RL runs are short
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW defaults
    warmup_steps: int = 0  # optimizer steps of linear LR warm-up
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # global L2 norm clip
    micro_batch_size: int = 8  # sequences per forward/backward per rank
    updates_per_batch: int = 1  # optimizer steps per rollout batch (mini-batches)
    clip_low: float = 0.2  # PPO: ratio >= 1 - clip_low
    clip_high: float = 0.28  # PPO: ratio <= 1 + clip_high (DAPO's clip-higher)
    dual_clip: float | None = None  # e.g. 3.0: bound the loss of negative advantages
    loss_agg: str = "token_mean"  # "token_mean" (global over the mini-batch) or "seq_mean"
    kl_coef: float = 0.0  # KL to the reference model (k3 estimator); 0 loads no reference


@dataclass
class ScoringConfig:
    packing: str = "auto"  # shared-prefix packed passes: "auto" (where supported), "true", "false" (padded)
    kernel_backend: str = "auto"  # cepo_kernels backend: auto, torch, triton, cuda (cuda: padded logits path only)
    micro_batch_tokens: int = 0  # packed micro-batch budget in tokens; 0: optim.micro_batch_size // G groups


@dataclass
class EngineConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO 0-3: 2 for multi-GPU full fine-tuning
    precision: str = "fp32"  # "fp32" or "bf16" (mixed precision by DeepSpeed)
    dist_backend: str | None = None  # None: nccl on GPUs, gloo on CPUs
    dist_timeout_s: float = 1800.0  # gloo/NCCL timeout: a missing rank or dead node fails after this, never hangs
    offload_optimizer: bool = False  # ZeRO >= 1: Adam state, master weights and gradients in CPU memory
    offload_param: bool = False  # ZeRO-3: parameter partitions in CPU memory (docs/scale_out.md: the cost)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output_dir: str = "runs/cepo"  # checkpoints, metrics.jsonl, final model
    steps: int = 100  # RL steps (rollout batches)
    seed: int = 0  # data order, sampling and init all derive from it
    save_every: int = 50  # checkpoint every K steps (and at the end); 0: only at the end
    keep_checkpoints: int = 2  # older checkpoints are deleted
    eval_every: int = 50  # held-out accuracy every K steps (and at the end); 0: only at the end
    progress_bar: bool = True  # tqdm bar with step, ETA and reward
    tensorboard: bool = False  # also write TensorBoard events (needs tensorboard)
    wandb_project: str | None = None  # also log to Weights & Biases (needs wandb)
    log_samples_every: int = 0  # every K steps rank 0 writes samples/step-K.jsonl (cepo viz); 0: off
    log_samples_groups: int = 4  # groups per samples file (mixed correct/wrong groups first)

    def __post_init__(self) -> None:
        validate(self)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _positive(name: str, value, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{name}: expected {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first bad field."""
    _choice("model.dtype", cfg.model.dtype, ("fp32", "bf16"))
    _choice("engine.precision", cfg.engine.precision, ("fp32", "bf16"))
    _choice("rollout.backend", cfg.rollout.backend, ("hf", "vllm"))
    if cfg.rollout.vllm_memory is not None and not cfg.rollout.vllm_memory > 0:
        raise ValueError(
            "rollout.vllm_memory: expected None or > 0 (GiB of KV cache on the CPU, a fraction in (0, 1] "
            f"of GPU memory on a GPU), got {cfg.rollout.vllm_memory!r}"
        )
    if cfg.rollout.vllm_threads is not None and cfg.rollout.vllm_threads < 1:
        raise ValueError(f"rollout.vllm_threads: expected None or >= 1, got {cfg.rollout.vllm_threads!r}")
    if cfg.rollout.tis_cap is not None and not cfg.rollout.tis_cap > 0:
        raise ValueError(f"rollout.tis_cap: expected None (off) or > 0, got {cfg.rollout.tis_cap!r}")
    if cfg.rollout.tis_cap is not None and cfg.rollout.backend != "vllm":
        raise ValueError("rollout.tis_cap: needs rollout.backend=vllm (the sampler's log-probs)")
    _choice("algorithm.name", cfg.algorithm.name, ("grpo", "rlsd", "cepo"))
    _choice("algorithm.lam_schedule", cfg.algorithm.lam_schedule, ("linear", "cosine", "constant"))
    _choice("algorithm.no_rejected", cfg.algorithm.no_rejected, ("rlsd", "grpo"))
    _choice("algorithm.teacher_image", cfg.algorithm.teacher_image, ("keep", "drop"))
    _choice("optim.loss_agg", cfg.optim.loss_agg, ("token_mean", "seq_mean"))
    cfg.scoring.packing = str(cfg.scoring.packing).lower()  # YAML reads `true` as a boolean
    _choice("scoring.packing", cfg.scoring.packing, ("auto", "true", "false"))
    _choice("scoring.kernel_backend", cfg.scoring.kernel_backend, ("auto", "torch", "triton", "cuda"))
    if cfg.scoring.kernel_backend == "cuda" and cfg.scoring.packing == "true":
        raise ValueError(
            "scoring.kernel_backend=cuda: the CUDA extension has the logits ops only, and the packed passes use "
            "the hidden-state ops; use scoring.packing=false or kernel_backend auto/torch/triton"
        )
    if cfg.engine.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage: expected 0, 1, 2 or 3, got {cfg.engine.zero_stage!r}")
    if not cfg.engine.dist_timeout_s > 0:
        raise ValueError(f"engine.dist_timeout_s: expected > 0 seconds, got {cfg.engine.dist_timeout_s!r}")
    if cfg.engine.offload_optimizer and cfg.engine.zero_stage == 0:
        raise ValueError("engine.offload_optimizer: needs engine.zero_stage >= 1 (the optimizer state is ZeRO's)")
    if cfg.engine.offload_param and cfg.engine.zero_stage != 3:
        raise ValueError("engine.offload_param: needs engine.zero_stage=3 (only stage 3 partitions the parameters)")
    for name in (
        "rollout.prompts_per_step",
        "rollout.group_size",
        "rollout.max_new_tokens",
        "steps",
        "optim.micro_batch_size",
        "optim.updates_per_batch",
        "data.max_prompt_tokens",
        "rollout.generation_batch_size",
        "rollout.temperature",
        "reward.timeout_s",
        "optim.lr",
    ):
        section, _, key = name.rpartition(".")
        _positive(name, getattr(getattr(cfg, section) if section else cfg, key))
    for name in (
        "save_every",
        "eval_every",
        "optim.warmup_steps",
        "algorithm.lam_decay_steps",
        "optim.kl_coef",
        "optim.clip_low",
        "optim.clip_high",
        "optim.weight_decay",
        "optim.grad_clip",
        "scoring.micro_batch_tokens",
    ):
        section, _, key = name.rpartition(".")
        _positive(name, getattr(getattr(cfg, section) if section else cfg, key), zero_ok=True)
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ValueError(f"rollout.top_p: expected in (0, 1], got {cfg.rollout.top_p!r}")
    if not 0.0 <= cfg.algorithm.lam <= 1.0:
        raise ValueError(f"algorithm.lam: expected in [0, 1], got {cfg.algorithm.lam!r}")
    if not 0.0 <= cfg.algorithm.eps_w < 1.0:
        raise ValueError(f"algorithm.eps_w: expected in [0, 1), got {cfg.algorithm.eps_w!r}")
    if cfg.optim.dual_clip is not None and cfg.optim.dual_clip <= 1.0:
        raise ValueError(f"optim.dual_clip: expected None or > 1, got {cfg.optim.dual_clip!r}")
    if cfg.algorithm.scale_by_std and cfg.rollout.group_size < 2:
        raise ValueError("rollout.group_size: expected >= 2 when algorithm.scale_by_std is true")
    if "{answer}" not in cfg.algorithm.teacher_template:
        raise ValueError("algorithm.teacher_template: must contain '{answer}'")
    _positive("log_samples_every", cfg.log_samples_every, zero_ok=True)
    _positive("log_samples_groups", cfg.log_samples_groups)
    if len(cfg.optim.betas) != 2:
        raise ValueError(f"optim.betas: expected two numbers, got {cfg.optim.betas!r}")


# Keys that older configs may still carry, and where they went.
MOVED_KEYS = {
    "optim.packing": "moved to scoring.packing",
    "optim.logprob_backend": "moved to scoring.kernel_backend",
    "optim.micro_batch_tokens": "moved to scoring.micro_batch_tokens",
    "optim.fused_head": "removed: the padded passes use the fused LM head wherever the head is a plain nn.Linear",
}


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- YAML file at ``path`` (may be None) <- dotted ``key=value`` overrides.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: an unknown key (named), a value of the wrong type, a missing required
            value (``model.path``, ``data.train_file``), or a value out of range.
    """
    schema = OmegaConf.structured(TrainConfig(model=ModelConfig(path="x"), data=DataConfig(train_file="x")))
    schema.model.path = "???"
    schema.data.train_file = "???"
    layers = [schema]
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        layers.append(OmegaConf.load(path))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected dotted.key=value")
    merged = layers[0]
    sources = [(layer, path) for layer in layers[1:]] + [(OmegaConf.from_dotlist(list(overrides)), "overrides")]
    for layer, source in sources:  # one merge per source, so an error names where the key came from
        try:
            merged = OmegaConf.merge(merged, layer)
        except (ConfigKeyError, ConfigAttributeError) as exc:
            if exc.full_key in MOVED_KEYS:
                raise ValueError(f"config key {exc.full_key!r} (from {source}): {MOVED_KEYS[exc.full_key]}") from None
            raise ValueError(f"unknown config key {exc.full_key!r} (from {source})") from None
        except ValidationError as exc:
            raise ValueError(f"config key {exc.full_key!r}: {exc.msg.splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ValueError(f"missing required config value(s): {', '.join(missing)}")
    return OmegaConf.to_object(merged)


def to_dict(cfg: TrainConfig) -> dict:
    """Plain nested dict (for logging and checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    OmegaConf.save(OmegaConf.create(to_dict(cfg)), path)
