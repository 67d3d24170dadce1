"""Prompts from a local data file: loading, checking, templating, filtering and a resumable order.

Each row needs a question and a ground-truth answer (field names configurable). The prompt is the
tokenizer's chat template applied to ``question + " " + instruction`` (plain text when the tokenizer
has no template). Prompts longer than ``max_prompt_tokens`` are dropped and counted.

With a vision-language model (``processor`` given), rows are EasyR1's: an image column
(``data.image_field``, default ``images``: paths, PNG/JPEG bytes or ``{"bytes": ...}``, one or a
list) and ``<image>`` placeholders in the question, one per image. Every image is decoded and sized
onto the patch grid at load time (:mod:`cepo.vision`); a missing or undecodable image or a
placeholder count that does not match is a ``ValueError`` naming the file and row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Example:
    question: str
    answer: str
    prompt: str  # the templated prompt text
    prompt_ids: list[int]  # its token ids
    images: tuple = ()  # the row's images as given (path / bytes / dict); decoded per step by cepo.vision


def _locate_bad_json_line(path: str) -> str | None:
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"{path}: row {i}: not valid JSON ({exc.msg})"
            if not isinstance(obj, dict):
                return f"{path}: row {i}: expected a JSON object, got {type(obj).__name__}"
    return None


def load_rows(path: str, question_field: str, answer_field: str) -> list[tuple[str, str]]:
    """``[(question, answer), ...]`` from a .jsonl/.json/.parquet/.csv file, via ``datasets``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown extension; a row that is not valid JSON, lacks a field or has an
            empty question or answer (the message names the file and the 1-based row).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{path}: unsupported extension {ext!r}; expected one of {sorted(FORMATS)}")
    import datasets

    datasets.disable_progress_bars()
    if FORMATS[ext] == "json" and ext == ".jsonl":
        bad = _locate_bad_json_line(path)
        if bad:
            raise ValueError(bad)
    try:
        ds = datasets.load_dataset(FORMATS[ext], data_files=path, split="train", keep_in_memory=True)
    except Exception as exc:
        raise ValueError(f"{path}: could not be read ({type(exc).__name__}: {exc})") from exc
    for name in (question_field, answer_field):
        if name not in ds.column_names:
            raise ValueError(f"{path}: row 1: no field {name!r} (fields: {ds.column_names})")
    rows = []
    for i, (q, a) in enumerate(zip(ds[question_field], ds[answer_field]), start=1):
        if q is None or not str(q).strip():
            raise ValueError(f"{path}: row {i}: empty or missing {question_field!r}")
        if a is None or not str(a).strip():
            raise ValueError(f"{path}: row {i}: empty or missing {answer_field!r}")
        rows.append((str(q), str(a)))
    return rows


def format_prompt(tokenizer, question: str, instruction: str, system_prompt: str | None) -> str:
    """Chat-templated prompt (generation prompt appended), or plain text without a template."""
    content = f"{question} {instruction}".strip()
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": content}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (f"{system_prompt}\n" if system_prompt else "") + content + "\n"


def load_image_column(path: str, field: str, n_rows: int) -> list[tuple]:
    """Per row, the images of column ``field`` as a tuple (``()`` without images); relative paths
    are taken from the data file's folder. Raises ``ValueError`` naming the file when the column is
    missing."""
    import datasets

    ext = os.path.splitext(path)[1].lower()
    ds = datasets.load_dataset(FORMATS[ext], data_files=path, split="train", keep_in_memory=True)
    if field not in ds.column_names:
        raise ValueError(f"{path}: row 1: no image field {field!r} (fields: {ds.column_names}); set data.image_field")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for value in ds.with_format(None)[field]:
        if value is None:
            items: list = []
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        fixed = []
        for item in items:
            if isinstance(item, str) and not os.path.isabs(item):
                item = os.path.join(base, item)
            elif isinstance(item, dict) and item.get("bytes") is None and item.get("path"):
                p = item["path"]
                item = p if os.path.isabs(p) else os.path.join(base, p)
            fixed.append(item)
        out.append(tuple(fixed))
    if len(out) != n_rows:
        raise ValueError(f"{path}: {len(out)} image rows for {n_rows} rows")
    return out


def load_examples(path: str, tokenizer, cfg, processor=None) -> tuple[list[Example], int]:
    """Templated, tokenized examples of ``path`` and the number dropped as too long.

    ``cfg`` is a :class:`cepo.config.DataConfig`. ``processor``: a :class:`cepo.vision.ImageProcessor`
    for a vision-language model (rows then carry images, see the module docstring), else None.
    """
    rows = load_rows(path, cfg.question_field, cfg.answer_field)
    images: list[tuple] = [()] * len(rows)
    if processor is not None:
        from cepo import vision

        min_px = getattr(cfg, "min_pixels", vision.DEFAULT_MIN_PIXELS)
        max_px = getattr(cfg, "max_pixels", vision.DEFAULT_MAX_PIXELS)
        images = load_image_column(path, getattr(cfg, "image_field", "images"), len(rows))
    examples, dropped = [], 0
    for i, ((question, answer), imgs) in enumerate(zip(rows, images), start=1):
        prompt = format_prompt(tokenizer, question, cfg.instruction, cfg.system_prompt)
        if processor is not None:
            try:
                sizes = [vision.resize_image(vision.decode_image(v), processor.grid, min_px, max_px).size for v in imgs]
                prompt = vision.expand_placeholders(prompt, [processor.grid.tokens(h, w) for w, h in sizes])
            except ValueError as exc:
                raise ValueError(f"{path}: row {i}: {exc}") from None
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_prompt_tokens:
            dropped += 1
            continue
        examples.append(Example(question, answer, prompt, ids, imgs))
    if not examples:
        raise ValueError(
            f"{path}: no usable rows ({dropped} longer than data.max_prompt_tokens={cfg.max_prompt_tokens})"
        )
    return examples, dropped


class PromptStream:
    """Endless, deterministic order over examples: a fresh permutation per epoch from ``seed``.

    ``state()`` / ``load_state()`` give the position (epoch, index) for resuming; every rank holds
    the same stream and takes its own slice of each global batch.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.index = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, k: int) -> list[int]:
        """The next ``k`` example indices (crossing epochs as needed)."""
        out = []
        while len(out) < k:
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(k - len(out), self.n - self.index)
            out.extend(self._perm[self.index : self.index + take])
            self.index += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n": self.n, "seed": self.seed}

    def load_state(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(
                f"data position was saved for n={state['n']}, seed={state['seed']}; "
                f"this run has n={self.n}, seed={self.seed}"
            )
        self.epoch, self.index = state["epoch"], state["index"]
        self._perm = self._permutation(self.epoch)
