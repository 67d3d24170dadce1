"""Tree attention as a transformers attention implementation (``attn_implementation="cepo_tree"``).

Registered through ``transformers.AttentionInterface.register`` on import. A forward over a packed
:class:`~cepo.packing.SegmentTable` passes

- ``input_ids`` and explicit ``position_ids`` (continuing from each segment's parent chain),
- no attention mask: ``"cepo_tree"`` registers a mask function (``AttentionMaskInterface``) that
  returns ``None`` and raises if a 2-D mask was given (without one, transformers would drop the
  mask silently for a custom implementation),
- the layout as the keyword argument ``tree_segments=...``, which the Qwen2 / Qwen3 / Llama
  decoder layers forward to every attention call.

Combinations that would silently attend across segments raise ``ValueError``: a 2-D (or any)
attention mask, flash-attention packing keywords (``cu_seq_lens_q`` ...), a KV cache, a sliding
window, dropout, or a model not switched to ``"cepo_tree"`` (e.g. ``flash_attention_2``, which
would treat restarting position ids as separate sequences and drop the shared prompt).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

from cepo_kernels.tree_attention import TreeLayout, tree_attention

IMPL = "cepo_tree"
SEGMENTS_KWARG = "tree_segments"
BACKEND_KWARG = "tree_backend"
SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
_FLASH_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# The decoder needs no log-sum-exp: the kernels then take their cheapest path (SDPA on the CPU).
_NO_LSE = {"need_lse": False} if "need_lse" in inspect.signature(tree_attention).parameters else {}


def cepo_tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query`` (B, H, T, D), ``key``/``value`` (B, H_kv, T, D)
    -> ``(out (B, T, H, D), None)``. Needs ``tree_segments`` (a ``TreeLayout`` or ``SegmentTable``)."""
    layout = kwargs.get(SEGMENTS_KWARG)
    if layout is None:
        raise ValueError(
            f"{IMPL} attention: no {SEGMENTS_KWARG}= keyword reached the attention layer; call the model "
            f"through cepo.hf_attention.packed_forward (or pass {SEGMENTS_KWARG}=table.layout())"
        )
    if not isinstance(layout, TreeLayout):
        layout = layout.layout()
    if attention_mask is not None:
        raise ValueError(
            f"{IMPL} attention: an attention mask was passed alongside {SEGMENTS_KWARG}; the segment table "
            "is the mask (padding is the tokens outside every segment), pass attention_mask=None"
        )
    bad = [k for k in _FLASH_PACKING_KWARGS if kwargs.get(k) is not None]
    if bad:
        raise ValueError(f"{IMPL} attention: flash-attention packing keywords {bad} would attend across segments")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"{IMPL} attention: sliding-window layers are not supported")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{IMPL} attention: attention logit soft-capping is not supported")
    if dropout:
        raise ValueError(f"{IMPL} attention: attention dropout is not supported (got {dropout}); use model.eval()")
    if query.shape[2] != layout.seq_len or key.shape[2] != layout.seq_len:
        raise ValueError(
            f"{IMPL} attention: {SEGMENTS_KWARG} is for rows of {layout.seq_len} tokens, got queries of "
            f"{query.shape[2]} and keys of {key.shape[2]} (a KV cache is not supported)"
        )
    out, _ = tree_attention(
        query, key, value, layout, scale=scaling, backend=kwargs.get(BACKEND_KWARG, "auto"), **_NO_LSE
    )
    return out.transpose(1, 2).contiguous(), None


def cepo_tree_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """transformers mask function for ``"cepo_tree"``: the segment table is the mask, so return
    ``None``; a 2-D padding mask passed to the model is an error (it cannot describe segments)."""
    if attention_mask is not None:
        raise ValueError(
            f"{IMPL} attention: an attention mask was passed alongside {SEGMENTS_KWARG}; the segment table "
            "is the mask (padding is the tokens outside every segment), pass attention_mask=None"
        )
    return None


def register() -> None:
    """Register ``"cepo_tree"`` (attention and mask functions) with transformers; idempotent, done on import."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL, cepo_tree_attention_forward)
    AttentionMaskInterface.register(IMPL, cepo_tree_mask)


def check_model(model: torch.nn.Module) -> None:
    """Raise unless ``model`` is a supported family and uses ``"cepo_tree"`` attention."""
    reason = supports(model)
    if reason:
        raise ValueError(f"model: {reason}")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != IMPL:
        raise ValueError(
            f"model: attn_implementation is {impl!r}, not {IMPL!r}; packed rows would attend across segments "
            f"(flash attention's position-id packing drops the shared prompt). Call cepo.hf_attention.enable(model)"
        )


def enable(model: torch.nn.Module) -> torch.nn.Module:
    """Switch ``model`` (Qwen2 / Qwen3 / Llama) to ``"cepo_tree"`` attention in place; returns it."""
    reason = supports(model)
    if reason:
        raise ValueError(f"model: {reason}")
    register()
    model.set_attn_implementation(IMPL)
    check_model(model)
    return model


def supports(model: torch.nn.Module) -> str | None:
    """``None`` when ``model`` (a causal LM, possibly inside peft / DeepSpeed) can run packed tree
    attention, else the reason it cannot."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"tree attention supports model types {SUPPORTED_MODEL_TYPES}, not {model_type!r}"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention is not supported with tree attention"
    return None


@contextmanager
def tree_mode(model: torch.nn.Module):
    """Run the body with ``model`` switched to ``"cepo_tree"`` attention, then switch it back.

    The weights are untouched: only the attention function that every layer looks up at call
    time changes, so ``generate`` keeps SDPA (and its KV cache) while the scoring and update passes
    share the prompt. Nesting is fine."""
    before = model.config._attn_implementation
    if before != IMPL:
        register()
        model.set_attn_implementation(IMPL)
    try:
        yield model
    finally:
        if before != IMPL:
            model.set_attn_implementation(before)


def packed_forward(model: torch.nn.Module, table, *, backend: str = "auto", **kwargs) -> torch.Tensor:
    """Last hidden states ``(R, T, hidden)`` of the decoder over a packed :class:`SegmentTable`.

    ``model`` is a ``...ForCausalLM`` (its decoder is run, not its LM head) or a bare decoder.
    Extra ``kwargs`` go to the decoder; ``attention_mask``, ``past_key_values``/``cache`` and
    ``use_cache=True`` are refused.
    """
    check_model(model)
    for name in ("attention_mask", "past_key_values", "cache"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: not allowed in a packed tree-attention forward")
    if kwargs.pop("use_cache", False):
        raise ValueError("use_cache: not allowed in a packed tree-attention forward")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layout = table.layout()
    out = decoder(
        input_ids=table.input_ids,
        position_ids=table.position_ids,
        use_cache=False,
        **{SEGMENTS_KWARG: layout, BACKEND_KWARG: backend},
        **kwargs,
    )
    return out.last_hidden_state


try:  # registration needs transformers; the kernels do not
    register()
except ImportError:  # pragma: no cover - transformers absent
    pass
