"""Per-GPU memory of a CEPO update step under DeepSpeed ZeRO-2 / ZeRO-3, on paper.

``python -m cepo.memory [--gpus 8] [--prompt 768] [--response 2048] [--group 8] [--no-checkpointing]``
prints a markdown table (GiB per GPU) for Qwen3-1.7B, Qwen3-4B, Qwen3-VL-4B and Qwen3-8B, computed
from the model configurations written below (no weights are read). The numbers are estimates of
the steady state of one packed update micro-batch; see ``docs/scale_out.md`` for the table.

Notation: ``P`` trainable parameters, ``N`` GPUs (data-parallel ranks), ``T`` tokens of one packed
micro-batch (one group: ``prompt + G * response``), ``L`` layers, ``h`` hidden size, ``V`` vocabulary,
bf16 mixed precision (DeepSpeed's ``bf16``: bf16 weights and gradients, fp32 master weights and
Adam moments). Per GPU, in bytes:

- parameters: ZeRO-2 ``2 P``; ZeRO-3 ``2 P / N + W``; ZeRO-3 with ``offload_param``: ``W``, where
  ``W = 2 (V h + P_layer)`` is the working set gathered at once (the LM head or embedding around
  its forward/backward, plus one prefetched decoder layer);
- gradients: ``2 P / N`` (reduce-scattered partitions; ZeRO-2 and ZeRO-3); with
  ``offload_optimizer`` they are copied to CPU bucket by bucket: ``0`` on the GPU (``4 P / N`` fp32
  on the CPU);
- optimizer: fp32 master weights + Adam ``m`` and ``v``: ``12 P / N``; ``offload_optimizer``: ``0``
  on the GPU (``12 P / N`` on the CPU);
- activations (the same under every ZeRO stage): with gradient checkpointing, each layer's input
  ``2 L T h`` plus one layer recomputed in backward ``2 T e``; without it ``2 L T e``; ``e`` is the
  number of values a decoder layer saves per token for backward (bf16):
  ``e = 4 h + 4 a d + 4 k d + 4 I`` (norm inputs and outputs, q / k / v before and after their norms
  and RoPE, attention output, o_proj input; gate, up, silu(gate), gate * up). The fused LM head
  never holds ``T x V`` logits (it adds ``O(T)``); a plain head would add ``4 T V`` (fp32 logits).

Not counted: DeepSpeed's communication buckets (``reduce_bucket_size`` 5e8 elements, ``1 GB`` in
bf16, and ZeRO-3 prefetch), the allocator's fragmentation, the CUDA context (~0.5 GB), a reference
model (``optim.kl_coef > 0``: another ``2 P`` or ``2 P / N``), vLLM's weights and KV cache
(``rollout.backend=vllm``), and image tokens of a vision model (the math prompts are text only).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class TextConfig:
    """The decoder numbers from a Qwen3 ``config.json``."""

    hidden: int  # hidden_size
    intermediate: int  # intermediate_size (SwiGLU)
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower numbers from a Qwen3-VL ``config.json`` (``vision_config``)."""

    depth: int
    hidden: int
    intermediate: int
    patch: int
    temporal_patch: int
    merge: int  # spatial_merge_size
    out_hidden: int
    deepstack: int  # len(deepstack_visual_indexes)
    positions: int  # num_position_embeddings


QWEN3_4B = TextConfig(2560, 9728, 36, 32, 8, 128, 151936, True)
MODELS: dict[str, tuple[TextConfig, VisionConfig | None]] = {
    "Qwen3-1.7B": (TextConfig(2048, 6144, 28, 16, 8, 128, 151936, True), None),
    "Qwen3-4B": (QWEN3_4B, None),
    "Qwen3-VL-4B": (QWEN3_4B, VisionConfig(24, 1024, 4096, 16, 2, 2, 2560, 3, 2304)),
    "Qwen3-8B": (TextConfig(4096, 12288, 36, 32, 8, 128, 151936, False), None),
}


def layer_params(c: TextConfig) -> int:
    """One decoder layer: q/k/v/o projections (no bias), q/k RMSNorms, SwiGLU MLP, two RMSNorms."""
    attn = c.hidden * c.heads * c.head_dim + 2 * c.hidden * c.kv_heads * c.head_dim + c.heads * c.head_dim * c.hidden
    return attn + 2 * c.head_dim + 3 * c.hidden * c.intermediate + 2 * c.hidden


def vision_params(v: VisionConfig) -> int:
    """Patch embedding (Conv3d with bias), learned positions, ViT blocks (LayerNorms, qkv, proj, GELU
    MLP, all with bias), the patch merger and the deepstack mergers (LayerNorm, two linear layers)."""
    block = 4 * v.hidden + 3 * v.hidden * v.hidden + 3 * v.hidden + v.hidden * v.hidden + v.hidden
    block += 2 * v.hidden * v.intermediate + v.intermediate + v.hidden
    merged = v.hidden * v.merge**2
    merger = merged * merged + merged + merged * v.out_hidden + v.out_hidden
    embed = 3 * v.temporal_patch * v.patch**2 * v.hidden + v.hidden + v.positions * v.hidden
    return embed + v.depth * block + (merger + 2 * v.hidden) + v.deepstack * (merger + 2 * merged)


def param_count(text: TextConfig, vision: VisionConfig | None = None) -> int:
    """All parameters: embedding, layers, final norm, LM head (if untied), vision tower."""
    n = text.vocab * text.hidden * (1 if text.tied else 2) + text.layers * layer_params(text) + text.hidden
    return n + (vision_params(vision) if vision else 0)


def saved_per_token(c: TextConfig) -> int:
    """``e``: values one decoder layer keeps per token for its backward (see the module docstring)."""
    return 4 * c.hidden + 4 * c.heads * c.head_dim + 4 * c.kv_heads * c.head_dim + 4 * c.intermediate


def estimate(
    text: TextConfig,
    vision: VisionConfig | None,
    *,
    stage: int,
    offload: bool,
    gpus: int,
    tokens: int,
    checkpointing: bool = True,
) -> dict[str, float]:
    """GiB per GPU: ``params``, ``grads``, ``optimizer``, ``activations``, ``total`` on the GPU and
    ``cpu`` per rank (offload). ``offload`` means ``offload_optimizer`` (ZeRO-2) or
    ``offload_optimizer`` + ``offload_param`` (ZeRO-3)."""
    if stage not in (2, 3):
        raise ValueError(f"stage: expected 2 or 3, got {stage!r}")
    p = param_count(text, vision)
    working = 2 * (text.vocab * text.hidden + layer_params(text))
    if stage == 2:
        params = 2 * p
    else:
        params = working if offload else 2 * p / gpus + working
    grads = 0 if offload else 2 * p / gpus
    optimizer = 0 if offload else 12 * p / gpus
    e = saved_per_token(text)
    if checkpointing:
        acts = 2 * text.layers * tokens * text.hidden + 2 * tokens * e
    else:
        acts = 2 * text.layers * tokens * e
    cpu = (16 * p / gpus + (2 * p / gpus if stage == 3 else 0)) if offload else 0
    out = dict(params=params, grads=grads, optimizer=optimizer, activations=acts)
    out["total"] = sum(out.values())
    out["cpu"] = cpu
    return {k: v / GIB for k, v in out.items()}


def table(gpus: int = 8, prompt: int = 768, response: int = 2048, group: int = 8, checkpointing: bool = True) -> str:
    """The markdown table (GiB per GPU) for every model in :data:`MODELS`."""
    tokens = prompt + group * response
    lines = [
        f"{gpus} GPUs, one packed group per micro-batch: T = {prompt} + {group} x {response} = {tokens} tokens; "
        f"bf16 + fp32 Adam; activations {'with' if checkpointing else 'without'} gradient checkpointing.",
        "",
        "| model | params (B) | ZeRO | offload | params | grads | optimizer | activations | GPU total | CPU per rank |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (text, vision) in MODELS.items():
        n = param_count(text, vision) / 1e9
        for stage in (2, 3):
            for offload in (False, True):
                r = estimate(
                    text, vision, stage=stage, offload=offload, gpus=gpus, tokens=tokens, checkpointing=checkpointing
                )
                what = "-" if not offload else ("optimizer" if stage == 2 else "optimizer + params")
                lines.append(
                    f"| {name} | {n:.2f} | {stage} | {what} | {r['params']:.2f} | {r['grads']:.2f} | "
                    f"{r['optimizer']:.2f} | {r['activations']:.2f} | {r['total']:.2f} | {r['cpu']:.2f} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cepo.memory", description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=768)
    ap.add_argument("--response", type=int, default=2048)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--no-checkpointing", action="store_true", help="activations without gradient checkpointing")
    a = ap.parse_args(argv)
    print(table(a.gpus, a.prompt, a.response, a.group, checkpointing=not a.no_checkpointing))


if __name__ == "__main__":
    main()
