"""The trainer on vision-language models (tiny Qwen3-VL / Qwen2.5-VL built from configs, EasyR1 data):
a packed CEPO step equals the padded one (the oracle) in float64 for ``teacher_image`` keep and
drop, with two groups of different image sizes in one packed row; the vision tower runs once per
prompt per step; ``drop`` builds the reference code's teacher inputs; vLLM on a CPU torch is a
clear error."""

from __future__ import annotations

import os
import random

import pytest
import torch

from cepo import demo_vision as dv
from cepo import vision
from cepo.config import load_config
from cepo.scoring import PaddedPasses
from cepo.train import Trainer
from tests.trainer.conftest import make_config
from tests.trainer.test_packed_step import compare_metrics, compare_params, raw_params

SHAPE = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=24)
PATCHES = {s: (s // dv.GRID.patch_size) ** 2 for s in (64, 96)}  # patches of a 64x64 and a 96x96 image


@pytest.fixture(scope="session")
def vl_assets(tmp_path_factory) -> dict:
    """Per kind a tiny VL model directory; one EasyR1 parquet of two rows (a 64x64 and a 96x96 image)."""
    out = str(tmp_path_factory.mktemp("vl"))
    rng = random.Random(0)
    rows = [dv.make_problem(rng, size=64), dv.make_problem(rng, size=96)]
    dv.write_easyr1(rows, os.path.join(out, "train.parquet"))
    paths = {"train": os.path.join(out, "train.parquet")}
    for kind in ("qwen3_vl", "qwen2_5_vl"):
        d = os.path.join(out, kind)
        tok = dv.build_tokenizer(d)
        dv.build_model(d, tok, kind=kind, seed=1, **SHAPE)
        paths[kind] = d
    return paths


def vl_config(vl_assets, kind: str, out: str, **kw) -> str:
    values = dict(
        data__question_field="problem", data__min_pixels=1024, data__max_pixels=16384, data__max_prompt_tokens=128,
        rollout__prompts_per_step=2, rollout__group_size=4, optim__micro_batch_size=8, algorithm__name="cepo",
    )  # fmt: skip
    values.update(kw)
    return make_config({"model": vl_assets[kind], "train": vl_assets["train"]}, out, **values)


@pytest.mark.parametrize("mode", ["keep", "drop"])
@pytest.mark.parametrize("kind", ["qwen3_vl", "qwen2_5_vl"])
def test_vl_packed_step_equals_padded_float64(vl_assets, tmp_path, float64, kind, mode):
    """One CEPO step, packed vs padded: every metric (log-probs, weights, A_t diagnostics, loss) to
    1e-9 relative and the parameters to 1e-10; the tower runs once per prompt (packed)."""
    kw = dict(algorithm__teacher_image=mode)
    t_pad = Trainer(load_config(vl_config(vl_assets, kind, str(tmp_path / "pad"), scoring__packing="false", **kw)))
    m_pad = t_pad.step(1)
    t_pack = Trainer(load_config(vl_config(vl_assets, kind, str(tmp_path / "pack"), scoring__packing="true", **kw)))
    m_pack = t_pack.step(1)
    assert not t_pad.packed and t_pack.packed
    assert next(iter(raw_params(t_pack).values())).dtype == torch.float64
    compare_metrics([m_pad], [m_pack], rel=1e-9)
    compare_params(raw_params(t_pad), raw_params(t_pack), atol=1e-10)
    # the vision tower: once per prompt per step packed (experience and update reuse it), per row padded
    assert m_pack["tokens/vision"] == sum(PATCHES.values())
    assert m_pack["tokens/vision"] * t_pack.cfg.rollout.group_size <= m_pad["tokens/vision"]
    assert vision.vision_frozen(t_pack.engine.module)


def test_vl_experience_packed_equals_padded_and_one_row(vl_assets, tmp_path, float64):
    """Experience log-probs, weights and A_t of the same rollouts, packed (both groups, images of
    two sizes, in ONE row) vs padded, to 1e-12."""
    cfg = load_config(vl_config(vl_assets, "qwen3_vl", str(tmp_path / "e"), scoring__packing="true"))
    trainer = Trainer(cfg)
    rollouts = trainer.generate(1)
    trainer.score_rewards(rollouts)
    rollouts.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])  # mixed groups: teachers on
    rollouts.texts = ["\\boxed{3}", "\\boxed{5}", "x", "\\boxed{3}", "\\boxed{9}", "y", "\\boxed{2}", "z"]
    seen = []
    real = vision.packed_vl_hidden

    def spy(model, table, roots, features, **kw):
        seen.append(table.input_ids.shape[0])
        return real(model, table, roots, features, **kw)

    vision.packed_vl_hidden, saved = spy, real
    try:
        packed = trainer.experience.score(trainer.engine.module, rollouts, 1.0)
    finally:
        vision.packed_vl_hidden = saved
    assert seen == [1]  # one decoder forward, one row
    assert packed.negatives is not None and any(n.value == "r-" for n in packed.negatives)
    trainer.experience.passes = PaddedPasses(trainer.cfg, trainer.tokenizer.pad_token_id, "cpu", fused_head=True)
    padded = trainer.experience.score(trainer.engine.module, rollouts, 1.0)
    for name in ("old_logp", "pos", "neg", "weights", "advantages"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=0, atol=1e-12, msg=name)
    assert (packed.weights != 1).any()


def test_drop_builds_the_reference_teacher_inputs(vl_assets, tmp_path):
    """teacher_image=drop: the teachers' root is the prompt with image pads replaced by the pad id,
    no pixels reach it, its tree has 1-D positions; padded, the teacher rows carry no images."""
    cfg = load_config(vl_config(vl_assets, "qwen3_vl", str(tmp_path / "d"), algorithm__teacher_image="drop"))
    trainer = Trainer(cfg)
    rollouts = trainer.generate(1)
    model, pad = trainer.engine.module, trainer.tokenizer.pad_token_id
    image_id = model.config.image_token_id
    from cepo.packing import Group

    G = rollouts.group_size
    groups = [Group(p, rollouts.responses[g * G : (g + 1) * G], [40, 41], [42]) for g, p in enumerate(rollouts.prompts)]
    packed = vision.pack_run(
        trainer.experience.passes, rollouts, groups, [0, 1], ("policy", "pos", "neg"), rollouts.width
    )
    assert packed.vision.roots == [(0, True), (0, False), (1, True), (1, False)]
    table = packed.table
    roots = vision.tree_roots(table)
    entries = [packed.vision.step.root(model, g, ids, with_image=w) for (g, w), ids in
               zip(packed.vision.roots, packed.vision.prompts)]  # fmt: skip
    positions = vision.packed_positions(table, entries)
    for k, (r, s, segs) in enumerate(roots):
        a, n = int(table.seg_start[r, s]), int(table.seg_len[r, s])
        ids = table.input_ids[r, a : a + n].tolist()
        prompt = rollouts.prompts[k // 2]
        if k % 2 == 0:  # the policy's root: the prompt with its image
            assert ids == prompt and entries[k] is not None
        else:  # the teachers' root: pads, 1-D positions, no pixels
            assert ids == [pad if t == image_id else t for t in prompt] and image_id not in ids
            assert entries[k] is None
            for d in segs:
                a2, n2 = int(table.seg_start[r, d]), int(table.seg_len[r, d])
                assert torch.equal(positions[:, r, a2 : a2 + n2], table.position_ids[r, a2 : a2 + n2].expand(3, -1))
    bases = vision.teacher_prompts(rollouts, pad, drop=True)
    assert all(image_id not in b for b in bases) and len(bases) == len(rollouts.responses)
    imgs = vision.row_images(rollouts, list(range(len(bases))), teacher=True, drop=True)
    assert imgs.rows == [None] * len(bases)
    assert all(x is not None for x in vision.row_images(rollouts, teacher=True, drop=False).rows)


def test_vllm_with_a_vl_model_on_cpu_torch_is_a_clear_error(vl_assets, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the CPU-torch message")
    cfg = load_config(vl_config(vl_assets, "qwen3_vl", str(tmp_path / "v"), rollout__backend="vllm"))
    with pytest.raises(ValueError, match="rollout.backend=vllm: vLLM's Qwen2.5-VL / Qwen3-VL modules need torchvision"):
        Trainer(cfg)


def test_vl_rollouts_never_contain_vision_tokens(vl_assets, tmp_path):
    """Sampling through the trainer's HF backend with images: no vision special token in any response."""
    cfg = load_config(vl_config(vl_assets, "qwen2_5_vl", str(tmp_path / "g"), rollout__max_new_tokens=24))
    trainer = Trainer(cfg)
    banned = set(vision.vision_token_ids(trainer.engine.module.config))
    with torch.no_grad():  # push the policy towards the vision tokens
        trainer.engine.module.lm_head.weight[sorted(banned)] *= 50
    rollouts = trainer.generate(1)
    assert not banned & {t for r in rollouts.responses for t in r}


def test_vl_zero3_is_a_clear_error(vl_assets, tmp_path):
    cfg = load_config(vl_config(vl_assets, "qwen3_vl", str(tmp_path / "z"), engine__zero_stage=3))
    with pytest.raises(ValueError, match="engine.zero_stage=3 with a vision-language model is not supported"):
        Trainer(cfg)
