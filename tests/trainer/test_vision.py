"""Vision-language building blocks against real transformers Qwen3-VL / Qwen2.5-VL models built from configs:
packed tree-attention forwards with 3-row positions equal unshared forwards (float64), the vision
tower's output reused with its DeepStack inputs, sampling never emits vision tokens, data rows with
images load (and bad ones fail naming the file and row), hub-layout model directories load."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from cepo import demo_vision as dv
from cepo import vision
from cepo.data import load_examples
from cepo.packing import Group, pack_groups, unshared_sequences

KINDS = ["qwen3_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def tok():
    return dv.build_tokenizer(None)


@pytest.fixture(scope="module", params=KINDS)
def model64(request, tok):
    torch.manual_seed(0)
    return dv.build_model(None, tok, kind=request.param, seed=0, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, head_dim=16).double()  # fmt: skip


def _groups(tok, model, sizes=(64, 96), seed=0):
    """Two groups with images of different sizes, 3 responses each, r+ and r-."""
    proc = vision.ImageProcessor(dv.GRID)
    rng = random.Random(seed)
    groups, images = [], []
    for size in sizes:
        p = dv.make_problem(rng, size=size)
        ids, inp = dv.prompt_inputs(tok, proc, p["question"], p["image"])
        inp.pixel_values = inp.pixel_values.to(next(model.parameters()).dtype)
        resp = [[rng.randrange(10, 100) for _ in range(rng.randint(2, 6))] for _ in range(3)]
        groups.append(Group(ids, resp, [40, 41, 42], [43, 44]))
        images.append(inp)
    return groups, images


def _unshared_logits(model, seq, images):
    ids = torch.tensor([seq])
    kw = {}
    if images is not None:
        kw = dict(pixel_values=images.pixel_values, image_grid_thw=images.image_grid_thw,
                  mm_token_type_ids=(ids == model.config.image_token_id).int())  # fmt: skip
    return model(input_ids=ids, **kw).logits[0]


def test_packed_vl_forward_matches_unshared_float64(model64, tok):
    """One packed row, two groups of different image sizes, policy / r+ / r- contexts: every
    response-predicting logit equals the unshared forward's (Qwen2.5-VL and Qwen3-VL)."""
    model = model64
    groups, images = _groups(tok, model)
    packed = pack_groups(groups, contexts=("policy", "pos", "neg"))
    assert packed.table.input_ids.shape[0] == 1
    roots = [vision.prompt_positions(model, g.prompt, x) for g, x in zip(groups, images)]
    assert all(delta < 0 for _, delta in roots)  # image tokens take fewer positions than tokens
    feats = [vision.encode_images(model, x) for x in images]
    with torch.no_grad():
        hidden = vision.packed_vl_hidden(model, packed.table, roots, feats, backend="torch")
        logits = model.lm_head(hidden).flatten(0, 1)
        for ctx in packed.contexts:
            idx, n = packed.predict_index(ctx), 0
            for g, x in zip(groups, images):
                for seq, resp in zip(unshared_sequences(g, ctx), g.responses):
                    ref = _unshared_logits(model, seq, x)[len(seq) - len(resp) - 1 : len(seq) - 1]
                    torch.testing.assert_close(logits[idx[n, : len(resp)]], ref, rtol=0, atol=1e-12)
                    n += 1
    # the text decoder went back to its own attention; the vision tower never left it
    assert model.model.language_model.config._attn_implementation == "sdpa"


def test_packed_vl_drop_mode_matches_reference_teacher(model64, tok):
    """teacher_image=drop: one root for the policy's responses (with the image), one image-free root
    (image pads -> pad id, 1-D positions, no pixels) for the teachers': equals the unshared forwards."""
    model = model64
    groups, images = _groups(tok, model)
    pad = tok.pad_token_id
    packed_groups, roots, feats = [], [], []
    for g, x in zip(groups, images):
        dropped = vision.drop_image_ids(list(g.prompt), model.config, pad)
        assert model.config.image_token_id not in dropped and dropped.count(pad) == sum(x.n_tokens(2))
        packed_groups += [Group(g.prompt, g.responses, contexts=("policy",)),
                          Group(dropped, g.responses, g.pos_answer, g.neg_answer, contexts=("pos", "neg"))]  # fmt: skip
        roots += [vision.prompt_positions(model, g.prompt, x), vision.prompt_positions(model, dropped, None)]
        feats.append(vision.encode_images(model, x))
    assert roots[1][1] == 0 and torch.equal(roots[1][0][0], torch.arange(len(groups[0].prompt)))
    packed = pack_groups(packed_groups, contexts=("policy", "pos", "neg"))
    with torch.no_grad():
        logits = model.lm_head(vision.packed_vl_hidden(model, packed.table, roots, feats, backend="torch")).flatten(
            0, 1
        )
        for ctx in packed.contexts:
            idx = packed.predict_index(ctx)
            for k, (g, x) in enumerate(zip(groups, images)):
                pg = packed_groups[2 * k + (ctx != "policy")]
                base = packed.group_offsets[2 * k + (ctx != "policy")]
                for i, (seq, resp) in enumerate(zip(unshared_sequences(pg, ctx), g.responses)):
                    ref = _unshared_logits(model, seq, x if ctx == "policy" else None)
                    ref = ref[len(seq) - len(resp) - 1 : len(seq) - 1]
                    torch.testing.assert_close(logits[idx[base + i, : len(resp)]], ref, rtol=0, atol=1e-12)


def test_packed_vl_gradients_match_unshared(tok):
    """Gradients of the summed response log-probs, vision tower included, packed vs unshared (Qwen3-VL)."""
    model = dv.build_model(None, tok, kind="qwen3_vl", seed=1, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, head_dim=16).double()  # fmt: skip
    groups, images = _groups(tok, model, seed=1)
    packed = pack_groups(groups, contexts=("policy",))
    roots = [vision.prompt_positions(model, g.prompt, x) for g, x in zip(groups, images)]
    feats = [vision.encode_images(model, x) for x in images]  # with grad: the tower is trained here
    logp = model.lm_head(vision.packed_vl_hidden(model, packed.table, roots, feats, backend="torch")).flatten(0, 1)
    logp = logp.log_softmax(-1)
    idx, tgt, mask = packed.predict_index("policy"), packed.targets(0), packed.mask()
    total = logp[idx.clamp(min=0)].gather(-1, tgt[..., None])[..., 0][mask].sum()
    total.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = 0
    for g, x in zip(groups, images):
        for seq, resp in zip(unshared_sequences(g, "policy"), g.responses):
            lp = _unshared_logits(model, seq, x).log_softmax(-1)[len(seq) - len(resp) - 1 : len(seq) - 1]
            ref = ref + lp.gather(-1, torch.tensor(resp)[:, None]).sum()
    ref.backward()
    torch.testing.assert_close(total, ref, rtol=1e-12, atol=0)
    assert any(k.startswith("model.visual.") for k in packed_grads)
    for k, p in model.named_parameters():
        if p.grad is not None:
            # relative to the largest entry: the tree-attention backward accumulates in float32
            err = ((packed_grads[k] - p.grad).abs().max() / p.grad.abs().max()).item()
            assert err < 1e-6, (k, err)


def test_reused_vision_output_needs_deepstack(tok):
    """Reusing the tower's output is exact only with its DeepStack inputs (Qwen3-VL)."""
    model = dv.build_model(None, tok, kind="qwen3_vl", seed=2, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, head_dim=16).double()  # fmt: skip
    groups, images = _groups(tok, model, seed=2)
    packed = pack_groups(groups[:1], contexts=("policy",))
    roots = [vision.prompt_positions(model, groups[0].prompt, images[0])]
    with torch.no_grad():
        cached = vision.encode_images(model, images[0]).detach()
        a = vision.packed_vl_hidden(model, packed.table, roots, [cached], backend="torch")
        b = vision.packed_vl_hidden(model, packed.table, roots, [cached], backend="torch")
        no_ds = vision.VisionFeatures(cached.embeds, None, cached.patches)
        c = vision.packed_vl_hidden(model, packed.table, roots, [no_ds], backend="torch")
    assert cached.deepstack is not None and len(cached.deepstack) == 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_generate_never_emits_vision_tokens(tok, kind):
    """A model pushed towards <|image_pad|> / <|vision_start|> still never samples them."""
    model = dv.build_model(None, tok, kind=kind, seed=3, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, head_dim=16)  # fmt: skip
    banned = vision.vision_token_ids(model.config)
    assert len(banned) == 4
    with torch.no_grad():
        model.lm_head.weight[banned] *= 0
        model.lm_head.weight[banned] += model.model.language_model.norm.weight.sign() * 5  # big logits
    groups, images = _groups(tok, model, seed=3)
    prompts = [list(g.prompt) for g in groups]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    attn = (ids != tok.pad_token_id).long()
    kw = vision.generate_kwargs(model, ids, images)
    torch.manual_seed(0)
    free = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=8, do_sample=True,
                          **{k: v for k, v in kw.items() if k != "suppress_tokens"})  # fmt: skip
    assert any(t in banned for t in free[:, width:].flatten().tolist())  # the push works
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=8, do_sample=True, **kw)
    assert not any(t in banned for t in out[:, width:].flatten().tolist())


# ---------------------------------------------------------------------------------------------- data
class _Cfg:
    question_field, answer_field, instruction, system_prompt = "problem", "answer", dv.INSTRUCTION, None
    max_prompt_tokens, image_field, min_pixels, max_pixels = 512, "images", dv.MIN_PIXELS, dv.MAX_PIXELS


def _png(size=64):
    return vision.image_to_png(dv.make_problem(random.Random(size), size=size)["image"])


def test_load_easyr1_rows_with_images(tmp_path, tok):
    """Parquet (PNG bytes) and JSONL (relative paths, a bare dict) rows load with their placeholders expanded."""
    rows = [dv.make_problem(random.Random(i)) for i in range(3)]
    dv.write_easyr1(rows, str(tmp_path / "a.parquet"))
    proc = vision.ImageProcessor(dv.GRID)
    examples, dropped = load_examples(str(tmp_path / "a.parquet"), tok, _Cfg, processor=proc)
    assert dropped == 0 and len(examples) == 3
    image_id = tok.convert_tokens_to_ids(vision.IMAGE_PAD)
    assert examples[0].prompt_ids.count(image_id) == (64 // dv.GRID.factor) ** 2  # one token per merged patch
    x = vision.example_images(examples[0].images, proc, _Cfg.min_pixels, _Cfg.max_pixels)
    assert x.image_grid_thw.tolist() == [[1, 64 // dv.GRID.patch_size, 64 // dv.GRID.patch_size]]
    (tmp_path / "img.png").write_bytes(_png(96))
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(json.dumps({"images": ["img.png"], "problem": "<image>How many?", "answer": "3"}) + "\n")
        f.write(json.dumps({"images": {"path": "img.png"}, "problem": "<image>Two?", "answer": "2"}) + "\n")
    examples, _ = load_examples(str(tmp_path / "b.jsonl"), tok, _Cfg, processor=proc)
    assert [e.prompt_ids.count(image_id) for e in examples] == [(96 // dv.GRID.factor) ** 2] * 2


@pytest.mark.parametrize(
    "row, message",
    [
        ({"images": ["missing.png"], "problem": "<image>Q", "answer": "1"}, "image file not found"),
        ({"images": ["bad.png"], "problem": "<image>Q", "answer": "1"}, "could not be decoded"),
        (
            {"images": ["ok.png"], "problem": "Q without placeholder", "answer": "1"},
            r"0 <image> placeholder\(s\) for 1",
        ),
        ({"images": [], "problem": "<image><image>Q", "answer": "1"}, r"2 <image> placeholder\(s\) for 0"),
    ],
    ids=["missing", "undecodable", "no-placeholder", "no-image"],
)
def test_bad_image_rows_name_file_and_row(tmp_path, tok, row, message):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "ok.png").write_bytes(_png())
    path = tmp_path / "d.jsonl"
    good = {"images": ["ok.png"], "problem": "<image>Q", "answer": "1"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"d\.jsonl: row 2: .*{message}"):
        load_examples(str(path), tok, _Cfg, processor=vision.ImageProcessor(dv.GRID))


# -------------------------------------------------------------------------------------------- models
def test_hub_layout_dir_loads_and_freezes_vision(tmp_path, tok):
    """A directory as the hub publishes it (preprocessor_config naming the torchvision-based
    Qwen2VLImageProcessor) loads through cepo.engine.load_policy with the vision tower frozen;
    LoRA never targets the vision tower; another VL family is a clear error."""
    from types import SimpleNamespace

    from cepo.config import ModelConfig
    from cepo.engine import load_policy

    d = str(tmp_path / "m")
    dv.build_tokenizer(d)
    dv.build_model(d, tok, kind="qwen3_vl", hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16)
    with open(os.path.join(d, "preprocessor_config.json")) as f:
        assert json.load(f)["image_processor_type"] == "Qwen2VLImageProcessor"
    proc = vision.ImageProcessor.from_dir(d)
    assert proc.grid == dv.GRID
    cfg = SimpleNamespace(model=ModelConfig(path=d))
    model = load_policy(cfg)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert vision.vision_frozen(model)
    assert any(p.requires_grad for p in model.model.language_model.parameters())
    cfg.model.lora = True
    lora = load_policy(cfg)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ".visual." not in n for n in names)
    with open(os.path.join(d, "config.json")) as f:
        conf = json.load(f)
    conf["model_type"] = "llava"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(conf, f)
    with pytest.raises(ValueError, match="'llava' is not supported; supported: qwen2_5_vl, qwen3_vl"):
        load_policy(cfg)


def test_padded_vl_forward_matches_unshared(model64, tok):
    """The padded oracle: left-padded rows with images of different sizes (and one image-free row)
    through the model's own attention equal the unshared forwards."""
    model = model64
    groups, images = _groups(tok, model)
    seqs = [list(groups[0].prompt) + list(groups[0].responses[0]), list(groups[1].prompt) + [50, 51],
            vision.drop_image_ids(list(groups[1].prompt), model.config, tok.pad_token_id) + [52]]  # fmt: skip
    rows_images = [images[0], images[1], None]
    width = max(map(len, seqs))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
    attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    with torch.no_grad():
        hidden = vision.padded_vl_hidden(model, ids, attn, rows_images)
        logits = model.lm_head(hidden)
        for b, (s, x) in enumerate(zip(seqs, rows_images)):
            ref = _unshared_logits(model, s, x)
            torch.testing.assert_close(logits[b, width - len(s) :], ref, rtol=0, atol=1e-10)


def test_viz_records_carry_the_group_image():
    """cepo viz: a VL step's sample records carry each group's image as a base64 PNG."""
    import base64
    from types import SimpleNamespace

    png = _png()
    step = vision.StepVision([None, None], image_token_id=6, sources=[(png,), ({"bytes": png},)])
    records = vision.records_with_images([{"group": 1}, {"group": 0}], SimpleNamespace(vision=step))
    for rec in records:
        (b64,) = rec["images_png_b64"]
        assert base64.b64decode(b64)[:4] == b"\x89PNG"
    assert vision.records_with_images([{"group": 0}], SimpleNamespace(vision=None)) == [{"group": 0}]
