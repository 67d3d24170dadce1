"""Log-probs of response tokens under a context: the policy's own prompt, or a teacher context.

Layout of every batch (one row per rollout)::

    [pad ... pad | context tokens | response tokens | pad ... pad]
      left-padded to the longest context   right-padded to the longest response

so the response occupies the same columns in every row and the logits needed are the last
``R + 1`` positions (``logits_to_keep``), of which the first ``R`` predict the response.
Position ids count only real tokens, as ``generate`` does with left padding. For the policy the
context is the prompt; for a teacher it is ``prompt + teacher_template.format(answer=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import cepo_kernels


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, C + R) int64
    attention_mask: torch.Tensor  # (B, C + R) int64
    position_ids: torch.Tensor  # (B, C + R) int64
    targets: torch.Tensor  # (B, R) int64, -100 at padding
    mask: torch.Tensor  # (B, R) bool, True at response tokens

    def rows(self, sl: slice) -> Batch:
        return Batch(
            self.input_ids[sl], self.attention_mask[sl], self.position_ids[sl], self.targets[sl], self.mask[sl]
        )

    def to(self, device) -> Batch:
        return Batch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids, self.targets, self.mask))
        )


def build_batch(
    contexts: list[list[int]], responses: list[list[int]], pad_id: int, response_width: int | None = None
) -> Batch:
    """Pack ``contexts[i] + responses[i]`` rows in the layout above.

    ``response_width`` fixes ``R`` (default: the longest response), so that the policy and the
    teacher batches of the same rollouts have identically shaped ``(B, R)`` outputs.
    """
    if len(contexts) != len(responses):
        raise ValueError(f"contexts and responses: {len(contexts)} vs {len(responses)} rows")
    c_width = max(len(c) for c in contexts)
    r_width = response_width if response_width is not None else max(1, max(len(r) for r in responses))
    rows, attn, targets = [], [], []
    for c, r in zip(contexts, responses):
        left, right = c_width - len(c), r_width - len(r)
        rows.append([pad_id] * left + list(c) + list(r) + [pad_id] * right)
        attn.append([0] * left + [1] * (len(c) + len(r)) + [0] * right)
        targets.append(list(r) + [-100] * right)
    input_ids = torch.tensor(rows, dtype=torch.long)
    attention_mask = torch.tensor(attn, dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    targets_t = torch.tensor(targets, dtype=torch.long)
    return Batch(input_ids, attention_mask, position_ids, targets_t, targets_t != -100)


def causal_lm(model):
    """The transformers causal LM inside a DeepSpeed engine and/or a peft wrapper."""
    lm = getattr(model, "module", model)  # DeepSpeed engine
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft (LoRA layers stay injected)


def fused_head_logprobs(
    model, batch: Batch, *, temperature: float, backend: str, return_entropy: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same result as the logits path, computed from the decoder's hidden states and the LM-head
    weight by ``cepo_kernels.linear_token_logprobs``: no ``(B, R, V)`` logits are made."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"optim.fused_head: needs a plain nn.Linear LM head, got {type(head).__name__} "
            "(e.g. LoRA on lm_head); set optim.fused_head=false"
        )
    r = batch.targets.shape[1]
    hidden = lm.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state[:, -(r + 1) : -1, :]
    return cepo_kernels.linear_token_logprobs(
        hidden.to(head.weight.dtype),
        head.weight,
        batch.targets,
        temperature=temperature,
        bias=head.bias,
        return_entropy=return_entropy,
        backend="auto" if backend == "cuda" else backend,  # the hidden-state ops have no cuda backend
    )


def forward_logprobs(
    model,
    batch: Batch,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    return_entropy: bool = False,
    fused_head: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``(B, R)`` float32 log-probs of the response tokens (0 at padding), differentiable.

    ``model`` is any causal LM taking ``input_ids, attention_mask, position_ids, logits_to_keep``
    (a transformers model, a peft model or a DeepSpeed engine around one). With ``fused_head`` the
    LM head is fused into the log-prob kernel (:func:`fused_head_logprobs`).
    """
    if fused_head:
        return fused_head_logprobs(
            model, batch, temperature=temperature, backend=backend, return_entropy=return_entropy
        )
    r = batch.targets.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=r + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :]
    return cepo_kernels.token_logprobs(
        logits, batch.targets, temperature=temperature, return_entropy=return_entropy, backend=backend
    )


@torch.no_grad()
def batched_logprobs(
    model, batch: Batch, *, micro_batch_size: int, temperature: float, backend: str, device, fused_head: bool = False
) -> torch.Tensor:
    """:func:`forward_logprobs` without gradients, ``micro_batch_size`` rows at a time; ``(B, R)``
    float32 (float64 for a float64 model) on the CPU."""
    outs = []
    for start in range(0, batch.input_ids.shape[0], micro_batch_size):
        mb = batch.rows(slice(start, start + micro_batch_size)).to(device)
        logp = forward_logprobs(model, mb, temperature=temperature, backend=backend, fused_head=fused_head)
        outs.append((logp if logp.dtype == torch.float64 else logp.float()).cpu())
    return torch.cat(outs, 0) if outs else torch.zeros(0, batch.targets.shape[1])
