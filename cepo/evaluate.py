"""Held-out accuracy: greedy decoding, scored by math-verify on the last ``\\boxed{}`` answer.

Used by the trainer every ``eval_every`` steps and by ``cepo eval MODEL_DIR DATA_FILE``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cepo.reward import math_correct
from cepo.rollout import HFGenerateBackend


def accuracy(
    model, tokenizer, examples, rollout_cfg, *, device, timeout_s: float = 5.0, synced_gpus: bool = False,
    images: list | None = None,
) -> float:  # fmt: skip
    """Fraction of ``examples`` answered correctly with greedy decoding.

    Under torch.distributed each rank decodes its share (rows ``rank::world``) and the counts are
    summed, so every rank returns the same number.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = examples[rank::world]
    mine_images = None if images is None else images[rank::world]  # VL models: per example its patches
    backend = HFGenerateBackend(model, tokenizer, rollout_cfg, device=device, synced_gpus=synced_gpus, greedy=True)
    correct = 0
    if mine:
        kw = {} if mine_images is None else {"images": mine_images}
        responses = backend.generate([ex.prompt_ids for ex in mine], 1, seed=0, **kw).tokens
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        correct = sum(math_correct(t, ex.answer, timeout_s) for t, ex in zip(texts, mine))
    counts = torch.tensor([float(correct), float(len(mine))])
    if dist.is_initialized():
        counts = counts.to(device)
        dist.all_reduce(counts)
    return (counts[0] / counts[1].clamp(min=1)).item()


def evaluate_directory(model_dir: str, data_file: str, overrides: list[str] = ()) -> float:
    """``cepo eval``: accuracy of the model in ``model_dir`` on ``data_file`` (single process)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cepo.config import load_config
    from cepo.data import load_examples
    from cepo.paths import check_data_file, check_model_dir, check_tokenizer_dir

    cfg = load_config(None, [f"model.path={model_dir}", f"data.train_file={data_file}", *overrides])
    check_model_dir(model_dir, "MODEL")
    check_data_file(data_file, "DATA")
    if cfg.model.tokenizer:
        check_tokenizer_dir(cfg.model.tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    from cepo import vision

    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    processor = vision.processor_for(cfg)  # VL models: AutoModelForImageTextToText and the images
    if processor is not None:
        model = vision.load_vl_model(model_dir, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.to(device).eval()
    examples, _ = load_examples(data_file, tokenizer, cfg.data, processor)
    if cfg.data.eval_limit:
        examples = examples[: cfg.data.eval_limit]
    images = vision.examples_images(examples, processor, cfg.data)
    return accuracy(
        model, tokenizer, examples, cfg.rollout, device=device, timeout_s=cfg.reward.timeout_s, images=images
    )
