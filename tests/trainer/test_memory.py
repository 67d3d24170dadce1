"""The memory script's parameter counts equal those of the transformers modules built from the same
configurations (on the meta device: no weights), and its table has every model and setting."""

from __future__ import annotations

import pytest
import torch

from cepo import memory


def _hf_count(text: memory.TextConfig, vision: memory.VisionConfig | None) -> int:
    from transformers import AutoModelForCausalLM, Qwen3Config

    kw = dict(
        hidden_size=text.hidden,
        intermediate_size=text.intermediate,
        num_hidden_layers=text.layers,
        num_attention_heads=text.heads,
        num_key_value_heads=text.kv_heads,
        head_dim=text.head_dim,
        vocab_size=text.vocab,
        tie_word_embeddings=text.tied,
    )
    with torch.device("meta"):
        if vision is None:
            model = AutoModelForCausalLM.from_config(Qwen3Config(**kw))
        else:
            from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

            vcfg = dict(
                depth=vision.depth,
                hidden_size=vision.hidden,
                intermediate_size=vision.intermediate,
                num_heads=16,
                patch_size=vision.patch,
                temporal_patch_size=vision.temporal_patch,
                spatial_merge_size=vision.merge,
                out_hidden_size=vision.out_hidden,
                deepstack_visual_indexes=[5, 11, 17][: vision.deepstack],
                num_position_embeddings=vision.positions,
            )
            cfg = Qwen3VLConfig(text_config=kw, vision_config=vcfg, tie_word_embeddings=text.tied)
            model = Qwen3VLForConditionalGeneration(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(memory.MODELS))
def test_param_count_matches_transformers(name):
    text, vision = memory.MODELS[name]
    assert memory.param_count(text, vision) == _hf_count(text, vision)


def test_table_zero3_offload_keeps_only_the_working_set_and_activations():
    text, vision = memory.MODELS["Qwen3-8B"]
    kw = dict(gpus=8, tokens=768 + 8 * 2048)
    z2 = memory.estimate(text, vision, stage=2, offload=False, **kw)
    z3 = memory.estimate(text, vision, stage=3, offload=False, **kw)
    off = memory.estimate(text, vision, stage=3, offload=True, **kw)
    assert z3["total"] < z2["total"] and off["total"] < z3["total"] and off["grads"] == off["optimizer"] == 0
    assert z2["activations"] == z3["activations"] == off["activations"]
    assert off["cpu"] * 8 == pytest.approx(18 * memory.param_count(text, vision) / memory.GIB)
    rows = [line for line in memory.table().splitlines() if line.startswith("| Qwen")]
    assert len(rows) == 4 * 4
    with pytest.raises(ValueError, match="stage"):
        memory.estimate(text, vision, stage=1, offload=False, **kw)
