"""Rollouts: ``G`` sampled responses per prompt, behind one small interface.

A backend implements :class:`RolloutBackend`: ``generate`` returns :class:`Samples` (the
response tokens and, when the sampler reports them, their log-probs), ``sync_weights`` makes the
next ``generate`` use the policy's current weights. :class:`HFGenerateBackend` samples with
``transformers``' ``generate`` on the policy itself; :class:`cepo.rollout_vllm.VLLMBackend` with a
colocated vLLM engine. :func:`build_rollout_backend` picks one from ``rollout.backend``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Samples:
    """What one ``generate`` call returns: ``len(prompts) * n`` responses, grouped by prompt
    (responses ``i * n ... (i + 1) * n - 1`` answer prompt ``i``).

    ``tokens``: response token ids, ending with EOS when the model stopped. ``logprobs``: the
    sampler's log-prob of each returned token (after temperature / top-p), aligned with
    ``tokens``; ``None`` when the sampler does not report them (``generate``)."""

    tokens: list[list[int]]
    logprobs: list[list[float]] | None = None


class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], n: int, seed: int) -> Samples:
        """``n`` samples for each prompt (token ids), grouped by prompt."""

    def sync_weights(self, model) -> None:
        """Make the next ``generate`` use ``model``'s current weights."""


def build_rollout_backend(cfg, model, tokenizer, device, synced_gpus: bool = False) -> RolloutBackend:
    """The rollout backend that ``cfg.rollout.backend`` asks for.

    ``cfg`` is the whole :class:`cepo.config.TrainConfig` (the vLLM engine needs the model path,
    the prompt budget, the precision and the seed); ``model`` the policy module (the HF backend
    samples with it; the vLLM backend receives its weights at ``sync_weights``). vLLM is imported
    only when asked for.
    """
    rcfg = cfg.rollout
    if rcfg.backend == "hf":
        return HFGenerateBackend(model, tokenizer, rcfg, device=device, synced_gpus=synced_gpus)
    if rcfg.backend != "vllm":
        raise ValueError(f"rollout.backend: expected 'hf' or 'vllm', got {rcfg.backend!r}")
    from cepo.vision import vllm_unavailable

    reason = vllm_unavailable(cfg.model.path)  # vision-language models: HF generate only, for now
    if reason:
        raise ValueError(reason)
    from cepo.rollout_vllm import VLLMBackend

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return VLLMBackend(
        cfg.model.path,
        tokenizer,
        rcfg,
        max_model_len=cfg.data.max_prompt_tokens + rcfg.max_new_tokens,
        dtype=torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32,
        device=device,
        tokenizer_path=cfg.model.tokenizer,
        seed=cfg.seed + rank,
        model=model,
    )


def logprobs_tensor(rows: list[list[float]] | None, width: int) -> torch.Tensor | None:
    """:attr:`Samples.logprobs` as a ``(B, width)`` float32 tensor, 0 past each response;
    ``None`` for ``None``."""
    if rows is None:
        return None
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r[:width], dtype=torch.float32)
    return out


def logprob_diff_metrics(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """``rollout/logprob_diff`` (mean) and ``rollout/logprob_diff_max`` of ``|sampler - old|`` over
    the response tokens (``mask``), both ``(B, R)``."""
    d = (sampler_logp.to(old_logp.device) - old_logp.float()).abs()[mask.to(old_logp.device)]
    if d.numel() == 0:
        return {"rollout/logprob_diff": 0.0, "rollout/logprob_diff_max": 0.0}
    return {"rollout/logprob_diff": d.mean().item(), "rollout/logprob_diff_max": d.max().item()}


class HFGenerateBackend:
    """Sampling with ``model.generate``; the policy model itself, so weights are always in sync.

    ``cfg`` is a :class:`cepo.config.RolloutConfig`; ``synced_gpus`` must be True under ZeRO-3 with
    several ranks (every rank then runs the same number of forward passes).
    """

    def __init__(self, model, tokenizer, cfg, *, device, synced_gpus: bool = False, greedy: bool = False):
        self.model, self.cfg, self.device, self.synced_gpus, self.greedy = model, cfg, device, synced_gpus, greedy
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = eos_ids(tokenizer, model)

    def sync_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, seed: int, images: list | None = None) -> Samples:
        """``images``: VL models, per prompt its ``cepo.vision.ImageInputs`` (or None); vision
        special tokens are never sampled."""
        torch.manual_seed(seed)
        rows = [p for p in prompts for _ in range(n)]
        row_images = None if images is None else [x for x in images for _ in range(n)]
        out: list[list[int]] = []
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(rows), self.cfg.generation_batch_size):
            chunk = rows[start : start + self.cfg.generation_batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=self.device)
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            kwargs = (
                dict(do_sample=False)
                if self.greedy
                else dict(do_sample=True, temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=0)
            )
            if row_images is not None:
                from cepo.vision import generate_kwargs

                chunk_images = row_images[start : start + self.cfg.generation_batch_size]
                kwargs.update(generate_kwargs(self.model, ids, chunk_images))
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=self.cfg.max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                use_cache=True,
                synced_gpus=self.synced_gpus,
                **kwargs,
            )
            for row in gen[:, width:].tolist():
                out.append(cut_at_eos(row, self.eos_ids, self.pad_id))
        self.model.train(was_training)
        return Samples(out)


def eos_ids(tokenizer, model) -> list[int]:
    ids = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("tokenizer: no eos_token_id; set one so that generation can stop")
    return ids


def cut_at_eos(row: list[int], eos_ids: list[int], pad_id: int) -> list[int]:
    """Response up to and including the first EOS; without EOS, up to the padding."""
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[: i + 1]
    while row and row[-1] == pad_id:
        row = row[:-1]
    return row
