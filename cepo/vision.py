"""Vision-language policies (Qwen2.5-VL, Qwen3-VL): images, model loading, 3-row positions, packed forwards.

- **Images** are decoded (path, PNG/JPEG bytes, ``{"bytes": ...}``/``{"path": ...}`` or a PIL image)
  and resized ONCE, here, to a size whose sides are multiples of the patch grid
  (``patch_size * merge_size``) and whose area lies in ``[min_pixels, max_pixels]``; the sampler
  and the trainer then see the same pixels. Pixels become patches with transformers' PIL image
  processor (``Qwen2VLImageProcessorPil``), which needs no torchvision.
- **Models** load with ``AutoModelForImageTextToText``; a directory laid out as the hub publishes it
  (its ``preprocessor_config.json`` names the torchvision-based ``Qwen2VLImageProcessor``) loads too,
  because only the patch geometry and normalisation are read from that file.
- **Positions.** A prompt with images takes the model's 3-row multimodal rope positions
  (``get_rope_index``); every token after it in the same tree (``r+``, ``r-``, responses) takes its
  1-D packed position plus the prompt's ``rope_delta = max(prompt mrope) + 1 - len(prompt)``, which
  is exactly what an unshared forward of ``[prompt, ..., response]`` computes.
- **Packed forward.** The vision tower runs once per prompt (:func:`encode_images`); its output and,
  for Qwen3-VL, the DeepStack inputs are scattered into the image-pad positions of the packed row
  and the text decoder runs with tree attention (``cepo_tree``) while the vision tower keeps its
  own attention (:func:`text_tree_mode`).
"""

from __future__ import annotations

import io
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

SUPPORTED_VL_TYPES = ("qwen2_5_vl", "qwen3_vl")
# model types whose text decoder runs tree attention (the decoder layers forward **kwargs to attention)
VL_TEXT_TYPES = ("qwen2_5_vl_text", "qwen3_vl_text")
IMAGE_PLACEHOLDER = "<image>"
VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
# EasyR1 / the reference code: images resized to 512x512 .. 2048x2048 pixels
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 262144, 4194304


# ------------------------------------------------------------------------------------------ model types
def model_type_of(path: str) -> str | None:
    """``model_type`` in ``path/config.json`` (None when absent or unreadable)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None


def is_vl_config(config) -> bool:
    """True when ``config`` (a transformers config) is a vision-language config (has a ``vision_config``)."""
    return getattr(config, "vision_config", None) is not None


def is_vl_dir(path: str) -> bool:
    """True when the model directory ``path`` holds a vision-language model (by ``config.json``)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return "vision_config" in cfg or cfg.get("model_type") in SUPPORTED_VL_TYPES


def check_vl_type(model_type: str | None, where: str = "model") -> None:
    """Raise ``ValueError`` unless ``model_type`` is a supported vision-language family."""
    if model_type not in SUPPORTED_VL_TYPES:
        raise ValueError(
            f"{where}: vision-language model type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_VL_TYPES)} (Qwen2.5-VL, Qwen3-VL)"
        )


def vl_root(model: torch.nn.Module) -> torch.nn.Module:
    """The ``...ForConditionalGeneration`` inside a peft / DeepSpeed wrapper."""
    seen = 0
    while not hasattr(model, "model") or not hasattr(model.model, "visual"):
        inner = getattr(model, "module", None) or getattr(model, "base_model", None)
        if inner is None or inner is model or seen > 8:
            raise ValueError(f"model: {type(model).__name__} is not a Qwen2.5-VL / Qwen3-VL model")
        model, seen = inner, seen + 1
    return model


def is_vl_model(model: torch.nn.Module) -> bool:
    """True for a Qwen2.5-VL / Qwen3-VL model (possibly inside peft / DeepSpeed)."""
    try:
        vl_root(model)
        return True
    except ValueError:
        return False


def vision_token_ids(config) -> list[int]:
    """Ids a policy must never sample: image / video pads and vision start / end markers."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({int(getattr(config, n)) for n in names if getattr(config, n, None) is not None})


# --------------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class PatchGrid:
    """The vision tower's patch geometry (from the model's ``vision_config`` or ``preprocessor_config.json``)."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2

    @property
    def factor(self) -> int:
        """Image sides are multiples of this (one merged token per ``factor x factor`` pixels)."""
        return self.patch_size * self.merge_size

    def tokens(self, height: int, width: int) -> int:
        """Image-pad tokens an image of ``height x width`` (already on the grid) takes in the prompt."""
        return (height // self.factor) * (width // self.factor)

    @classmethod
    def from_config(cls, config) -> PatchGrid:
        v = config.vision_config
        return cls(int(v.patch_size), int(v.spatial_merge_size), int(v.temporal_patch_size))


def smart_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(h, w)``: multiples of ``factor`` near ``height x width`` (aspect ratio kept) with
    ``min_pixels <= h * w <= max_pixels`` (the same rule as the Qwen-VL processors)."""
    if min(height, width) <= 0:
        raise ValueError(f"image has size {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is more than 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def decode_image(value):
    """A PIL RGB image from a path, PNG/JPEG bytes, ``{"bytes": ..., "path": ...}`` or a PIL image.

    Raises ``ValueError`` (missing file, undecodable bytes, unknown type)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("image: a dict without 'bytes' or 'path'")
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, str):
            if not os.path.isfile(value):
                raise ValueError(f"image file not found: {value}")
            img = Image.open(value)
        else:
            raise ValueError(f"image: expected a path, bytes or a dict with 'bytes', got {type(value).__name__}")
        img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image could not be decoded ({type(exc).__name__}: {exc})") from exc
    return img.convert("RGB")


def resize_image(img, grid: PatchGrid, min_pixels: int, max_pixels: int):
    """``img`` resized (bicubic) onto the patch grid with its area in ``[min_pixels, max_pixels]``."""
    from PIL import Image

    h, w = smart_size(img.height, img.width, grid.factor, min_pixels, max_pixels)
    if (h, w) == (img.height, img.width):
        return img
    return img.resize((w, h), Image.Resampling.BICUBIC)


def image_to_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class ImageProcessor:
    """Pixels -> patches for a Qwen-VL vision tower, on the CPU stack (no torchvision).

    Built from the model directory's ``preprocessor_config.json`` (hub layout; its class name is
    not used) or from the model config. ``encode(images)`` expects images already on the grid
    (:func:`resize_image`) and returns :class:`ImageInputs`.
    """

    def __init__(self, grid: PatchGrid, image_mean=None, image_std=None):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.grid = grid
        kw = {}
        if image_mean is not None:
            kw.update(image_mean=list(image_mean), image_std=list(image_std))
        self._proc = Qwen2VLImageProcessorPil(
            patch_size=grid.patch_size,
            merge_size=grid.merge_size,
            temporal_patch_size=grid.temporal_patch_size,
            do_resize=False,
            **kw,
        )

    @classmethod
    def from_dir(cls, path: str, config=None) -> ImageProcessor:
        """From ``path/preprocessor_config.json`` when present, else from ``config.vision_config``."""
        file = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(file):
            with open(file) as f:
                pc = json.load(f)
            grid = PatchGrid(
                int(pc.get("patch_size", 14)), int(pc.get("merge_size", 2)), int(pc.get("temporal_patch_size", 2))
            )
            return cls(grid, pc.get("image_mean"), pc.get("image_std"))
        if config is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
        return cls(PatchGrid.from_config(config))

    def encode(self, images: list) -> ImageInputs:
        """Patches of ``images`` (PIL, on the grid): :class:`ImageInputs` (float32 pixels)."""
        for img in images:
            if img.height % self.grid.factor or img.width % self.grid.factor:
                raise ValueError(
                    f"image of {img.width}x{img.height} is not on the {self.grid.factor}-pixel grid; resize it first"
                )
        out = self._proc(images=list(images), return_tensors="pt")
        return ImageInputs(out["pixel_values"].float(), out["image_grid_thw"].long())


def save_image_processor_config(path: str, grid: PatchGrid, min_pixels: int, max_pixels: int) -> None:
    """Write ``preprocessor_config.json`` as the hub's Qwen-VL directories carry it."""
    cfg = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "patch_size": grid.patch_size,
        "merge_size": grid.merge_size,
        "temporal_patch_size": grid.temporal_patch_size,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
    }
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


@dataclass
class ImageInputs:
    """One prompt's images as patches: ``pixel_values`` ``(patches, C*tp*p*p)`` float32,
    ``image_grid_thw`` ``(n_images, 3)`` int64 (temporal, height, width in patches)."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def n_tokens(self, merge_size: int) -> list[int]:
        """Image-pad tokens per image."""
        return (self.image_grid_thw.prod(-1) // merge_size**2).tolist()

    @property
    def patches(self) -> int:
        return int(self.pixel_values.shape[0])


def expand_placeholders(text: str, n_tokens: list[int]) -> str:
    """``text`` with its k-th ``<image>`` replaced by ``<|vision_start|>`` + ``n_tokens[k]`` pads + ``<|vision_end|>``.

    Raises ``ValueError`` when the placeholder count differs from ``len(n_tokens)``."""
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(n_tokens):
        raise ValueError(f"{len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) for {len(n_tokens)} image(s)")
    out = [parts[0]]
    for n, rest in zip(n_tokens, parts[1:]):
        out.append(VISION_START + IMAGE_PAD * n + VISION_END + rest)
    return "".join(out)


def drop_image_ids(ids: list[int], config, pad_id: int) -> list[int]:
    """The reference code's teacher prompt: image-pad ids replaced by ``pad_id`` (no pixels)."""
    image_id = int(config.image_token_id)
    return [pad_id if t == image_id else t for t in ids]


# ---------------------------------------------------------------------------------------------- models
def load_vl_model(path: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """A Qwen2.5-VL / Qwen3-VL model from a local directory (``AutoModelForImageTextToText``).

    Raises ``ValueError`` naming the supported families for any other vision-language type."""
    from transformers import AutoModelForImageTextToText

    check_vl_type(model_type_of(path), f"model.path={path}")
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kw)


def freeze_vision(model: torch.nn.Module) -> int:
    """Freeze the vision tower (and its merger / DeepStack mergers) in place; returns parameters frozen."""
    visual = vl_root(model).model.visual
    n = 0
    for p in visual.parameters():
        if p.requires_grad:
            p.requires_grad_(False)
            n += p.numel()
    return n


def vision_frozen(model: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in vl_root(model).model.visual.parameters())


def lora_targets_outside_vision(targets: list[str]) -> str:
    """A regex for peft's ``target_modules``: the modules named ``targets`` outside the vision tower."""
    alternatives = "|".join(targets)
    return rf"^(?!.*\bvisual\b).*\.({alternatives})$"


@contextmanager
def text_tree_mode(model: torch.nn.Module):
    """Run the body with the TEXT decoder on ``"cepo_tree"`` attention (the vision tower keeps its own)."""
    from cepo import hf_attention

    hf_attention.register()
    lm = vl_root(model).model.language_model
    before = lm.config._attn_implementation
    if lm.config.model_type not in VL_TEXT_TYPES:
        raise ValueError(f"model: tree attention supports VL text models {VL_TEXT_TYPES}, not {lm.config.model_type!r}")
    if before != hf_attention.IMPL:
        lm.set_attn_implementation(hf_attention.IMPL)
    try:
        yield model
    finally:
        if before != hf_attention.IMPL:
            lm.set_attn_implementation(before)


# -------------------------------------------------------------------------------------------- positions
def prompt_positions(model: torch.nn.Module, prompt_ids, images: ImageInputs | None) -> tuple[torch.Tensor, int]:
    """``(positions (3, P) int64, rope_delta)`` of one prompt: the model's ``get_rope_index``
    (multimodal rope) with images, ``arange`` on all three rows and delta 0 without."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).view(1, -1)
    if images is None:
        return torch.arange(ids.shape[1]).view(1, -1).expand(3, -1).clone(), 0
    inner = vl_root(model).model
    mm = (ids == int(inner.config.image_token_id)).int()
    pos, delta = inner.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=images.image_grid_thw.cpu())
    return pos[:, 0].cpu(), int(delta.view(-1)[0])


def tree_roots(table) -> list[tuple[int, int, list[int]]]:
    """Per root segment (parent -1, non-empty), in row-major order: ``(row, segment, descendant
    segments including itself)``."""
    out = []
    parents = table.seg_parent.cpu().tolist()
    lens = table.seg_len.cpu().tolist()
    for r, (par, ln) in enumerate(zip(parents, lens)):
        root_of = []
        for s, p in enumerate(par):
            root_of.append(s if p < 0 else root_of[p])
        for s, p in enumerate(par):
            if p < 0 and ln[s] > 0:
                out.append((r, s, [d for d in range(len(par)) if root_of[d] == s and ln[d] > 0]))
    return out


def packed_positions(table, roots: list[tuple[torch.Tensor, int] | None]) -> torch.Tensor:
    """``(3, R, T)`` int64 positions of a packed table: each root segment with an entry in ``roots``
    (row-major root order; ``(positions (3, P), rope_delta)`` or None for a text-only root) takes
    those positions; every descendant token takes its 1-D packed position plus the root's delta."""
    pos = table.position_ids.cpu().unsqueeze(0).repeat(3, 1, 1)
    found = tree_roots(table)
    if len(found) != len(roots):
        raise ValueError(f"packed_positions: {len(found)} root segments, {len(roots)} root entries")
    starts, lens = table.seg_start.cpu(), table.seg_len.cpu()
    for (r, s, segs), entry in zip(found, roots):
        if entry is None:
            continue
        root_pos, delta = entry
        a, n = int(starts[r, s]), int(lens[r, s])
        if root_pos.shape[1] != n:
            raise ValueError(f"packed_positions: root of {n} tokens, positions for {root_pos.shape[1]}")
        for d in segs:
            if d != s:
                a2, n2 = int(starts[r, d]), int(lens[r, d])
                pos[:, r, a2 : a2 + n2] += delta
        pos[:, r, a : a + n] = root_pos
    return pos.to(table.input_ids.device)


# ---------------------------------------------------------------------------------------- vision tower
@dataclass
class VisionFeatures:
    """The vision tower's output for one prompt: ``embeds`` ``(n_tokens, hidden)`` (merged image
    tokens) and, for Qwen3-VL, ``deepstack`` (one ``(n_tokens, hidden)`` per DeepStack layer)."""

    embeds: torch.Tensor
    deepstack: list[torch.Tensor] | None
    patches: int

    def detach(self) -> VisionFeatures:
        ds = None if self.deepstack is None else [d.detach() for d in self.deepstack]
        return VisionFeatures(self.embeds.detach(), ds, self.patches)


def encode_images(model: torch.nn.Module, images: ImageInputs) -> VisionFeatures:
    """Run the vision tower once over one prompt's images (differentiable when grad is enabled)."""
    inner = vl_root(model).model
    device = inner.visual.get_device() if hasattr(inner.visual, "get_device") else None
    device = next(inner.visual.parameters()).device if device is None else device
    out = inner.get_image_features(images.pixel_values.to(device), images.image_grid_thw.to(device), return_dict=True)
    embeds = torch.cat(list(out.pooler_output), dim=0)
    ds = getattr(out, "deepstack_features", None)
    deepstack = None if ds is None else [torch.cat(list(d), dim=0) for d in ds]
    return VisionFeatures(embeds, deepstack, images.patches)


def packed_vl_hidden(
    model: torch.nn.Module,
    table,
    roots: list[tuple[torch.Tensor, int] | None],
    features: list[VisionFeatures],
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Last hidden states ``(R, T, hidden)`` of the text decoder over a packed table with images.

    ``roots``: see :func:`packed_positions`. ``features``: one :class:`VisionFeatures` per root
    that carries image pads, in row-major order; they fill the image-pad positions of the table
    (``table.input_ids == image_token_id``) in order. The text decoder runs with tree attention.
    """
    from cepo.hf_attention import BACKEND_KWARG, SEGMENTS_KWARG

    root = vl_root(model)
    inner = root.model
    lm = inner.language_model
    ids = table.input_ids
    device = ids.device
    embeds = lm.get_input_embeddings()(ids)
    image_mask = ids == int(inner.config.image_token_id)
    kwargs = {}
    if features:
        img = torch.cat([f.embeds for f in features], dim=0).to(device, embeds.dtype)
        if img.shape[0] != int(image_mask.sum()):
            raise ValueError(
                f"packed_vl_hidden: {int(image_mask.sum())} image-pad tokens, {img.shape[0]} image features"
            )
        embeds = embeds.masked_scatter(image_mask[..., None], img)
        if features[0].deepstack is not None:
            kwargs["visual_pos_masks"] = image_mask
            kwargs["deepstack_visual_embeds"] = [
                torch.cat([f.deepstack[k] for f in features], dim=0).to(device, embeds.dtype)
                for k in range(len(features[0].deepstack))
            ]
    elif bool(image_mask.any()):
        raise ValueError("packed_vl_hidden: image-pad tokens in the table but no image features")
    positions = packed_positions(table, roots).to(device)
    with text_tree_mode(model):
        out = lm(
            inputs_embeds=embeds,
            position_ids=positions,
            use_cache=False,
            **{SEGMENTS_KWARG: table.layout(), BACKEND_KWARG: backend},
            **kwargs,
        )
    return out.last_hidden_state


# ---------------------------------------------------------------------------------------------- sampling
def generate_kwargs(model: torch.nn.Module, input_ids: torch.Tensor, images: list[ImageInputs | None]) -> dict:
    """Extra ``generate`` keywords for a batch of left-padded prompts ``input_ids`` ``(B, W)`` whose
    row ``b`` has the images ``images[b]`` (None: none): the patches of all rows in row order, their
    grids, ``mm_token_type_ids`` (1 at image pads) and ``suppress_tokens`` (the vision special
    tokens, which a policy must never sample)."""
    config = vl_root(model).config
    kw: dict = {"suppress_tokens": vision_token_ids(config)}
    present = [x for x in images if x is not None]
    if present:
        device = input_ids.device
        kw["pixel_values"] = torch.cat([x.pixel_values for x in present]).to(device)
        kw["image_grid_thw"] = torch.cat([x.image_grid_thw for x in present]).to(device)
        kw["mm_token_type_ids"] = (input_ids == int(config.image_token_id)).int()
        dtype = next(vl_root(model).model.visual.parameters()).dtype
        kw["pixel_values"] = kw["pixel_values"].to(dtype)
    return kw


def example_images(images: tuple, processor: ImageProcessor, min_pixels: int, max_pixels: int) -> ImageInputs | None:
    """One data row's images (as loaded by :func:`cepo.data.load_examples`) as patches; None without images."""
    if not images:
        return None
    return processor.encode([resize_image(decode_image(v), processor.grid, min_pixels, max_pixels) for v in images])


# ------------------------------------------------------------------------------------------ one step
class StepVision:
    """One step's images: per prompt ``g`` its :class:`ImageInputs` (or None), its root positions
    and, when the vision tower is frozen, the tower's output computed once and reused by every pass
    of the step (experience, reference, update). ``patches`` counts patches run through the tower
    (``tokens/vision``)."""

    def __init__(self, images: list[ImageInputs | None], image_token_id: int, sources: list | None = None):
        self.images, self.image_token_id = images, int(image_token_id)
        self.sources = sources  # per prompt the row's images as loaded (for cepo viz)
        self._roots: dict[tuple[int, bool], tuple[torch.Tensor, int] | None] = {}
        self._features: dict[tuple[int, int], VisionFeatures] = {}
        self.patches = 0
        self.tower_calls = 0

    def root(self, model, g: int, prompt_ids, *, with_image: bool = True) -> tuple[torch.Tensor, int] | None:
        """Root-position entry (:func:`packed_positions`) of prompt ``g``; None for a text-only root."""
        images = self.images[g] if with_image else None
        if images is None:
            return None
        key = (g, with_image)
        if key not in self._roots:
            self._roots[key] = prompt_positions(model, prompt_ids, images)
        return self._roots[key]

    def features(self, model, g: int) -> VisionFeatures:
        """The tower's output for prompt ``g``: cached (no grad) when the tower is frozen, else
        computed anew (with grad when grad is enabled)."""
        frozen = vision_frozen(model)
        key = (g, id(vl_root(model).model.visual))  # the policy's and a reference's towers are cached apart
        if frozen and key in self._features:
            return self._features[key]
        self.tower_calls += 1
        self.patches += self.images[g].patches
        if frozen:
            with torch.no_grad():
                feats = encode_images(model, self.images[g]).detach()
            self._features[key] = feats
            return feats
        return encode_images(model, self.images[g])


@dataclass
class PackedVision:
    """What a packed VL forward needs besides the table: per root segment (row-major) the prompt
    index ``g`` and whether that root carries the image (False: ``teacher_image=drop``'s root)."""

    step: StepVision
    roots: list[tuple[int, bool]]
    prompts: list  # prompt token ids per root

    def hidden(self, model, table, backend: str = "auto") -> torch.Tensor:
        entries, feats = [], []
        for (g, with_image), ids in zip(self.roots, self.prompts):
            entry = self.step.root(model, g, ids, with_image=with_image)
            entries.append(entry)
            if entry is not None:
                feats.append(self.step.features(model, g))
        return packed_vl_hidden(model, table, entries, feats, backend=backend)


def padded_vl_hidden(model, input_ids, attention_mask, rows_images: list[ImageInputs | None]) -> torch.Tensor:
    """Last hidden states ``(B, T, hidden)`` of an ordinary (padded, the model's own attention)
    forward: row ``b`` is left-padded (``attention_mask``) and carries ``rows_images[b]``; 3-row
    positions from :func:`prompt_positions` on the row's real tokens (image pads before any text
    that follows them)."""
    root = vl_root(model)
    B, T = input_ids.shape
    pos = torch.zeros(3, B, T, dtype=torch.long)
    ids_cpu, attn_cpu = input_ids.cpu(), attention_mask.cpu().bool()
    for b in range(B):
        real = ids_cpu[b][attn_cpu[b]]
        p, _ = prompt_positions(model, real.tolist(), rows_images[b])
        pos[:, b, attn_cpu[b]] = p
    present = [x for x in rows_images if x is not None]
    kw = {}
    if present:
        dtype = next(root.model.visual.parameters()).dtype
        kw["pixel_values"] = torch.cat([x.pixel_values for x in present]).to(input_ids.device, dtype)
        kw["image_grid_thw"] = torch.cat([x.image_grid_thw for x in present]).to(input_ids.device)
    out = root.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=pos.to(input_ids.device), use_cache=False, **kw
    )
    return out.last_hidden_state


# ------------------------------------------------------------------------------------ trainer hooks
def processor_for(cfg) -> ImageProcessor | None:
    """The image processor of ``cfg.model.path`` when it is a vision-language model, else None."""
    if not is_vl_dir(cfg.model.path):
        return None
    check_vl_type(model_type_of(cfg.model.path), f"model.path={cfg.model.path}")
    if cfg.engine.zero_stage == 3:
        raise ValueError(
            "engine.zero_stage=3 with a vision-language model is not supported yet (the vision tower runs "
            "outside the engine's forward); use zero_stage <= 2"
        )
    return ImageProcessor.from_dir(cfg.model.path)


def examples_images(examples, processor: ImageProcessor | None, data_cfg) -> list[ImageInputs | None] | None:
    """Per example its patches (None without images); None for a text model (``processor`` None)."""
    if processor is None:
        return None
    return [example_images(ex.images, processor, data_cfg.min_pixels, data_cfg.max_pixels) for ex in examples]


def packing_unavailable(model) -> str | None:
    """Why a VL model cannot run packed passes (None: it can)."""
    lm = vl_root(model).model.language_model
    if lm.config.model_type not in VL_TEXT_TYPES:
        return f"tree attention supports VL text models {VL_TEXT_TYPES}, not {lm.config.model_type!r}"
    if getattr(lm.config, "use_sliding_window", False):
        return "sliding-window attention is not supported with tree attention"
    return None


def vllm_unavailable(model_path: str) -> str | None:
    """Why ``rollout.backend=vllm`` cannot sample a VL model here (None: it can be tried)."""
    if not is_vl_dir(model_path):
        return None
    if not torch.cuda.is_available():
        return (
            "rollout.backend=vllm: vLLM's Qwen2.5-VL / Qwen3-VL modules need torchvision, which has no build for "
            "this CPU torch; use rollout.backend=hf (transformers generate with the images) on the CPU"
        )
    return (
        "rollout.backend=vllm with a vision-language model is not implemented yet (multi_modal_data and the "
        "vision weights in the weight push); use rollout.backend=hf"
    )


# ------------------------------------------------------------------------------- the scoring passes
def pack_run(passes, rollouts, groups: list, prompt_idx: list[int], contexts: tuple[str, ...], width: int):
    """Pack one run of groups of a VL step (``groups[k]`` is prompt ``prompt_idx[k]``'s) and attach
    what the packed forward needs (``packed.vision``, a :class:`PackedVision`).

    ``algorithm.teacher_image=drop`` with teacher contexts: each group becomes two trees, the
    policy's ``prompt | G`` and the teachers' image-free ``prompt' | r+ | r- | 2G`` (image pads
    replaced by the pad id, 1-D positions, no pixels); ``packed.rows_of[context]`` ``(b,)`` then
    gives, per response, the packed response that carries that context."""
    from cepo.packing import Group

    step = rollouts.vision
    drop = passes.cfg.algorithm.teacher_image == "drop" and any(c != "policy" for c in contexts)
    if not drop:
        packed = passes.pack(groups, contexts, width)
        packed.vision = PackedVision(step, [(g, True) for g in prompt_idx], [grp.prompt for grp in groups])
        return packed
    split, roots, prompts = [], [], []
    for grp, g in zip(groups, prompt_idx):
        dropped = [passes.pad_id if t == step.image_token_id else t for t in grp.prompt]
        teacher_ctx = tuple(c for c in (grp.contexts or contexts) if c != "policy")
        split.append(Group(grp.prompt, grp.responses, contexts=("policy",)))
        split.append(Group(dropped, grp.responses, grp.pos_answer, grp.neg_answer, contexts=teacher_ctx))
        roots += [(g, True), (g, False)]
        prompts += [grp.prompt, dropped]
    packed = passes.pack(split, contexts, width)
    packed.vision = PackedVision(step, roots, prompts)
    policy_rows, teacher_rows = [], []
    for k, grp in enumerate(groups):
        a, b = packed.group_offsets[2 * k], packed.group_offsets[2 * k + 1]
        policy_rows += range(a, a + len(grp.responses))
        teacher_rows += range(b, b + len(grp.responses))
    policy_t, teacher_t = torch.tensor(policy_rows), torch.tensor(teacher_rows)
    packed.rows_of = {c: policy_t if c == "policy" else teacher_t for c in contexts}
    return packed


@dataclass
class RowImages:
    """A padded batch's images: ``rows[b]`` the :class:`ImageInputs` of row ``b`` (None: none);
    ``step`` counts the patches the padded passes run through the tower."""

    step: StepVision
    rows: list

    def __getitem__(self, sl: slice) -> RowImages:
        return RowImages(self.step, self.rows[sl])


def row_images(rollouts, rows: list[int] | slice | None = None, *, teacher: bool = False, drop: bool = False):
    """:class:`RowImages` of rollout rows ``rows`` (default all); None for a text step. The
    teachers' rows under ``teacher_image=drop`` carry no images."""
    step = rollouts.vision
    if step is None:
        return None
    per = rollouts.per_rollout(step.images)
    picked = per[rows] if isinstance(rows, slice) else per if rows is None else [per[i] for i in rows]
    if teacher and drop:
        picked = [None] * len(picked)
    return RowImages(step, list(picked))


def teacher_prompts(rollouts, pad_id: int, drop: bool) -> list[list[int]]:
    """Per rollout, the prompt the teacher passes extend: the policy's, or with ``drop`` the
    image-free one (image pads replaced by ``pad_id``)."""
    contexts = rollouts.contexts()
    if not drop or rollouts.vision is None:
        return contexts
    image_id = rollouts.vision.image_token_id
    return [[pad_id if t == image_id else t for t in c] for c in contexts]


def padded_forward_hidden(model, input_ids, attention_mask, images: RowImages) -> torch.Tensor:
    """:func:`padded_vl_hidden` of a padded batch, counting the patches run through the tower."""
    images.step.patches += sum(x.patches for x in images.rows if x is not None)
    images.step.tower_calls += sum(x is not None for x in images.rows)
    return padded_vl_hidden(model, input_ids, attention_mask, images.rows)


def step_vision(model, images: list[ImageInputs | None] | None, sources: list | None = None) -> StepVision | None:
    """A :class:`StepVision` for one step's prompts' images (None for a text step); ``sources``:
    per prompt the images as loaded (kept for ``cepo viz``)."""
    return None if images is None else StepVision(images, vl_root(model).config.image_token_id, sources)


def records_with_images(records: list[dict], rollouts, max_side: int = 256) -> list[dict]:
    """``cepo.samples`` records with each group's images as base64 PNG (``images_png_b64``) for
    ``cepo viz``; unchanged for a text step."""
    import base64

    step = rollouts.vision
    if step is None or step.sources is None:
        return records
    for rec in records:
        pngs = []
        for value in step.sources[rec["group"]]:
            img = decode_image(value)
            img.thumbnail((max_side, max_side))
            pngs.append(base64.b64encode(image_to_png(img)).decode("ascii"))
        rec["images_png_b64"] = pngs
    return records


def copy_processor_config(src: str, dst: str) -> None:
    """Copy ``preprocessor_config.json`` (if any) from model directory ``src`` to ``dst``."""
    import shutil

    path = os.path.join(src, "preprocessor_config.json")
    if os.path.isfile(path):
        shutil.copy(path, os.path.join(dst, "preprocessor_config.json"))
