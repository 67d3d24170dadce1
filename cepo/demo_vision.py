"""The embedded vision-language default: ``python -m cepo.demo --task vision``, a few minutes on 2 CPU cores.

1. A synthetic visual arithmetic task: a 64x64 image with red and blue squares (14x14 pixels in
   the cells of a 4x4 grid; a cell is 2x2 patches of 8 pixels, one merged image token); the
   question "<image>Compute red + 2 x blue." needs the image. Each
   problem carries a worked solution (``red=2\\nblue=1\\n2+2*1=4\\n\\boxed{4}``) and a flawed one
   whose box holds the red count only (every line right, only the box wrong), as in the text demo.
2. A character-level tokenizer with the Qwen-VL vision special tokens and a ChatML template.
3. A tiny random-init Qwen3-VL (``transformers.Qwen3VLConfig``, about 1M parameters) saved as a
   normal model directory with its tokenizer and a hub-style ``preprocessor_config.json``.
4. A short supervised warm start on the worked solutions (a fraction of them flawed).
5. CEPO with ``configs/demo_vision.yaml`` and a held-out accuracy table.

``--skip-train`` writes ``DIR/base_model``, ``DIR/train.parquet`` and ``DIR/eval.parquet`` (EasyR1
format: ``images`` (PNG bytes), ``problem`` with an ``<image>`` placeholder, ``answer``) and stops.
"""

from __future__ import annotations

import math
import os
import random
import time

import torch

from cepo import demo, vision

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = [
    "<pad>", "<unk>", "<|im_start|>", "<|im_end|>",
    vision.VISION_START, vision.VISION_END, vision.IMAGE_PAD, vision.VIDEO_PAD,
]  # fmt: skip
INSTRUCTION = "Answer in \\boxed{}."
SIZE, CELL = 64, 16  # image side and cell side: one merged image token (2x2 patches of 8 pixels) per cell
GRID = vision.PatchGrid(patch_size=8, merge_size=2, temporal_patch_size=2)
MIN_PIXELS, MAX_PIXELS = 32 * 32, 128 * 128  # the demo's data.min_pixels / data.max_pixels
COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220)}


# ----------------------------------------------------------------------------------------- task
def make_problem(rng: random.Random, size: int = SIZE) -> dict:
    """One problem: ``red`` (1-4) red and ``blue`` (0-3) blue squares at distinct cells of the
    ``size // 16`` grid; the answer is ``red + 2 * blue``. Returns the PIL image, question, answer,
    solution and flawed solution."""
    from PIL import Image, ImageDraw

    red, blue = rng.randint(1, 4), rng.randint(0, 3)
    cells = rng.sample([(x, y) for x in range(size // CELL) for y in range(size // CELL)], red + blue)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, (x, y) in enumerate(cells):
        color = COLORS["red"] if k < red else COLORS["blue"]
        draw.rectangle([x * CELL + 1, y * CELL + 1, x * CELL + CELL - 2, y * CELL + CELL - 2], fill=color)
    answer = red + 2 * blue
    work = f"red={red}\nblue={blue}\n{red}+2*{blue}={answer}"
    return {
        "image": img,
        "question": f"{vision.IMAGE_PLACEHOLDER}Compute red + 2 x blue.",
        "answer": str(answer),
        "solution": f"{work}\n\\boxed{{{answer}}}",
        "flawed_solution": f"{work}\n\\boxed{{{red}}}",
        "key": (red, blue, tuple(cells)),
    }


def make_split(rng: random.Random, n: int, seen: set, size: int = SIZE) -> list[dict]:
    rows = []
    while len(rows) < n:
        p = make_problem(rng, size)
        if p["key"] not in seen:
            seen.add(p["key"])
            rows.append(p)
    return rows


def write_easyr1(rows: list[dict], path: str) -> None:
    """EasyR1 rows in parquet: ``images`` (list of ``{"bytes": PNG}``), ``problem``, ``answer``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "images": [[{"bytes": vision.image_to_png(r["image"]), "path": None}] for r in rows],
            "problem": [r["question"] for r in rows],
            "answer": [r["answer"] for r in rows],
        }
    )
    pq.write_table(table, path)


def make_data(out: str, *, seed: int = 0, n_sft: int = 2000, n_rl: int = 800, n_eval: int = 128) -> dict:
    """Disjoint SFT / RL / held-out splits: ``{"sft": rows, "train": path, "eval": path}`` (the RL and
    eval splits are EasyR1 parquet files in ``out``; the SFT rows stay in memory)."""
    rng = random.Random(seed)
    seen: set = set()
    splits = {name: make_split(rng, n, seen) for name, n in (("eval", n_eval), ("train", n_rl), ("sft", n_sft))}
    paths = {"sft": splits["sft"]}
    for name in ("train", "eval"):
        paths[name] = os.path.join(out, f"{name}.parquet")
        write_easyr1(splits[name], paths[name])
    return paths


# ------------------------------------------------------------------------------ tokenizer, model
def build_tokenizer(out: str | None):
    """Character-level tokenizer (printable ASCII, newline) with the vision special tokens; saved to ``out``."""
    return demo.build_tokenizer(out, special=SPECIAL, additional=SPECIAL[2:], chat_template=CHAT_TEMPLATE)


def vl_config(tokenizer, kind: str = "qwen3_vl", **shape):
    """A tiny Qwen3-VL (``kind="qwen3_vl"``) or Qwen2.5-VL (``"qwen2_5_vl"``) config for ``tokenizer``;
    ``shape`` overrides text-config fields (``hidden_size``, ``num_hidden_layers``, ...)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    text.update(shape)
    hd = text["head_dim"] if kind == "qwen3_vl" else text["hidden_size"] // text["num_attention_heads"]
    half = hd // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]  # temporal, height, width frequencies
    token_ids = dict(
        image_token_id=ids[vision.IMAGE_PAD],
        video_token_id=ids[vision.VIDEO_PAD],
        vision_start_token_id=ids[vision.VISION_START],
        vision_end_token_id=ids[vision.VISION_END],
    )
    vis_hidden = 64
    if kind == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                   "mrope_interleaved": True}  # fmt: skip
        vis = dict(
            depth=2, hidden_size=vis_hidden, intermediate_size=128, num_heads=2, patch_size=GRID.patch_size,
            spatial_merge_size=GRID.merge_size, temporal_patch_size=GRID.temporal_patch_size,
            out_hidden_size=text["hidden_size"], num_position_embeddings=64, deepstack_visual_indexes=[0],
        )  # fmt: skip
        return Qwen3VLConfig(text_config=text, vision_config=vis, tie_word_embeddings=True, **token_ids)
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text.pop("head_dim")
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        vis = dict(
            depth=2, hidden_size=vis_hidden, intermediate_size=128, num_heads=2, patch_size=GRID.patch_size,
            spatial_merge_size=GRID.merge_size, temporal_patch_size=GRID.temporal_patch_size,
            out_hidden_size=text["hidden_size"], window_size=GRID.factor * 2, fullatt_block_indexes=[1],
        )  # fmt: skip
        return Qwen2_5_VLConfig(text_config=text, vision_config=vis, tie_word_embeddings=True, **token_ids)
    vision.check_vl_type(kind, "kind")
    raise AssertionError  # unreachable


def build_model(out: str | None, tokenizer, *, kind: str = "qwen3_vl", seed: int = 0, **shape):
    """Tiny random-init VL model; saved (with ``preprocessor_config.json``) to ``out`` when given."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = vl_config(tokenizer, kind, **shape)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if out:
        model.save_pretrained(out)
        vision.save_image_processor_config(out, GRID, MIN_PIXELS, MAX_PIXELS)
    return model.eval()


# ----------------------------------------------------------------------------------- warm start
def prompt_inputs(
    tokenizer, processor: vision.ImageProcessor, question: str, image
) -> tuple[list[int], vision.ImageInputs]:
    """Token ids of the templated prompt (placeholders expanded) and the image patches."""
    img = vision.resize_image(image, processor.grid, MIN_PIXELS, MAX_PIXELS)
    inputs = processor.encode([img])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{question} {INSTRUCTION}"}], tokenize=False, add_generation_prompt=True
    )
    text = vision.expand_placeholders(text, inputs.n_tokens(processor.grid.merge_size))
    return tokenizer(text, add_special_tokens=False)["input_ids"], inputs


def warm_start(model, tokenizer, rows: list[dict], *, steps: int, flawed_fraction: float = 0.6, batch_size: int = 32,
               lr: float = 3e-3, seed: int = 0, log=print) -> None:  # fmt: skip
    """Supervised fine-tuning (loss on response tokens only), in place. A ``flawed_fraction`` of
    the demonstrations box the red count instead of the answer (more than half: the warm-started
    model's greedy answer is often the red count, which RL with a verifiable reward removes)."""
    processor = vision.ImageProcessor(GRID)
    rng = random.Random(seed)
    encoded = []
    for row in rows:
        ids, inputs = prompt_inputs(tokenizer, processor, row["question"], row["image"])
        sol = row["flawed_solution"] if rng.random() < flawed_fraction else row["solution"]
        resp = tokenizer(sol, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((ids, resp, inputs))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    image_id = model.config.image_token_id
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = rng.sample(encoded, batch_size)
        seqs = [p + r for p, r, _ in batch]
        width = max(map(len, seqs))
        input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        labels = torch.tensor([[-100] * len(p) + r + [-100] * (width - len(p) - len(r)) for p, r, _ in batch])
        attn = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()
        pixels = torch.cat([x.pixel_values for _, _, x in batch])
        grid = torch.cat([x.image_grid_thw for _, _, x in batch])
        loss = model(
            input_ids=input_ids, attention_mask=attn, labels=labels, pixel_values=pixels, image_grid_thw=grid,
            mm_token_type_ids=(input_ids == image_id).int(),
        ).loss  # fmt: skip
        demo.sft_update(model, opt, sched, loss, step, steps, t0, log)
    model.eval()


def build_assets(out: str, *, sft_steps: int = 250, seed: int = 0, log=print) -> dict[str, str]:
    """Data (EasyR1 parquet), tokenizer and warm-started base model under ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    data = make_data(out, seed=seed)
    model_dir = os.path.join(out, "base_model")
    tokenizer = build_tokenizer(model_dir)
    model = build_model(model_dir, tokenizer, seed=seed)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    log(f"warm start: {n:.2f}M-parameter Qwen3-VL, {sft_steps} SFT steps")
    if sft_steps:
        warm_start(model, tokenizer, data["sft"], steps=sft_steps, seed=seed, log=log)
    model.save_pretrained(model_dir)
    return {"model": model_dir, "train": data["train"], "eval": data["eval"]}


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows: list[dict], *, max_new_tokens: int = 40, batch_size: int = 64) -> float:
    """Held-out accuracy of greedy answers (the last ``\\boxed{}`` equals the answer) on in-memory rows."""
    from cepo.reward import extract_boxed

    processor = vision.ImageProcessor(GRID)
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = [prompt_inputs(tokenizer, processor, r["question"], r["image"]) for r in chunk]
        width = max(len(ids) for ids, _ in enc)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p, _ in enc])
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in enc])
        kw = vision.generate_kwargs(model, ids, [x for _, x in enc])
        out = model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kw,
        )  # fmt: skip
        for row, seq in zip(chunk, out[:, width:]):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            correct += extract_boxed(text) == row["answer"]
    return correct / max(1, len(rows))


def run(args) -> int:
    """``python -m cepo.demo --task vision``: ``args`` as parsed by :func:`cepo.demo.main`."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)))
    t0 = time.time()
    if args.model:  # any local Qwen2.5-VL / Qwen3-VL directory: only the data is made here
        os.makedirs(args.out, exist_ok=True)
        data = make_data(args.out, n_sft=0)
        paths = {"model": args.model, "train": data["train"], "eval": data["eval"]}
    else:
        paths = build_assets(args.out, sft_steps=args.sft_steps)
    print(f"assets built in {time.time() - t0:.0f}s under {args.out}")
    if args.skip_train:
        return 0
    return demo.train_and_report(args.config or "demo_vision.yaml", paths, args.out, list(args.overrides), t0)
