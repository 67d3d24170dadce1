"""The packed step (``scoring.packing``) equals the padded one (``scoring.packing=false``, the oracle).

Float64 runs compare every logged metric of steps 1-2 to 1e-9 relative and the parameters to
1e-10: the packed and padded passes differ only in rounding, and in float64 that is ~1e-15. (The
stock RMSNorm upcasts to float32, so the float64 runs patch it; DeepSpeed refuses to all-reduce
float64 gradients, which with one rank is the identity, so that call is skipped.)

The float32 run (ZeRO-2, which refuses float64 parameters) compares the parameters after the
first step to ``ZERO2_ATOL`` = 1e-4, 1% of a step: Adam's first step is ``lr * g / (|g| + eps)``,
so a gradient entry that float32 rounding moves by ``d`` moves its weight by
``lr * eps * d / (|g| + eps)^2``. That is negligible where ``|g| >> eps``, but entries whose sum
over tokens cancels to ``|g| ~ 1e-8`` carry relative errors of ~1e-2 and move by up to
``lr * 1e-2 / 4 ~ 3e-5`` (measured: 3.4e-5 at lr = 1e-2). ``grad_norm`` and ``entropy`` are
compared to 1e-4 relative; metrics that cancel (the loss, a mean of ``delta`` around 1e-3) to
1e-5 absolute.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import cepo.scoring as scoring_mod
from cepo.config import load_config
from cepo.scoring import PaddedPasses
from cepo.train import Trainer
from tests.trainer.conftest import TINY, make_config

IGNORED = ("time/", "cpu_time/", "tokens/")
ZERO2_ATOL = 1e-4  # timings, and token counts (that packing changes by design)


@pytest.fixture(scope="session")
def llama_assets(assets, tmp_path_factory):
    """The same tokenizer and data with a tiny random-init Llama."""
    import transformers

    out = str(tmp_path_factory.mktemp("llama"))
    tok = transformers.AutoTokenizer.from_pretrained(assets["model"])
    dims = {k: v for k, v in TINY.items() if k != "head_dim"}
    config = transformers.LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **dims)
    torch.manual_seed(2)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return {**assets, "model": out}


def raw_params(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.engine.module.named_parameters()}


def two_steps(assets, out, *, after_first: bool = False, **kw):
    """Steps 1 and 2; the parameters after step 2 (after step 1 with ``after_first``)."""
    trainer = Trainer(load_config(make_config(assets, out, steps=2, **kw)))
    metrics = [trainer.step(1)]
    first = raw_params(trainer)
    metrics.append(trainer.step(2))
    return trainer, metrics, first if after_first else raw_params(trainer)


def compare_metrics(a: list[dict], b: list[dict], *, rel: float, abs_keys=(), atol: float = 0.0):
    for step, (ma, mb) in enumerate(zip(a, b), start=1):
        keys = [k for k in ma if not k.startswith(IGNORED)]
        assert sorted(keys) == sorted(k for k in mb if not k.startswith(IGNORED))
        for k in keys:
            x, y = ma[k], mb[k]
            if isinstance(x, float) and math.isnan(x):
                assert math.isnan(y), (step, k)
            elif any(k.startswith(p) for p in abs_keys):
                assert y == pytest.approx(x, abs=atol), (step, k)
            else:
                assert y == pytest.approx(x, rel=rel, abs=1e-12), (step, k)


def compare_params(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize(
    "family,algorithm", [("qwen3", "grpo"), ("qwen3", "rlsd"), ("qwen3", "cepo"), ("llama", "cepo")]
)
def test_packed_step_equals_padded_float64(assets, llama_assets, tmp_path, float64, family, algorithm):
    a = assets if family == "qwen3" else llama_assets
    kw = dict(algorithm__name=algorithm, rollout__prompts_per_step=4, optim__micro_batch_size=8)
    t_pad, m_pad, p_pad = two_steps(a, str(tmp_path / "pad"), scoring__packing="false", **kw)
    t_pack, m_pack, p_pack = two_steps(a, str(tmp_path / "pack"), scoring__packing="true", **kw)
    assert not t_pad.packed and t_pack.packed
    assert next(iter(p_pack.values())).dtype == torch.float64
    compare_metrics(m_pad, m_pack, rel=1e-9)
    compare_params(p_pad, p_pack, atol=1e-10)
    moved = Trainer(load_config(make_config(a, str(tmp_path / "fresh"), scoring__packing="false")))
    assert any(not torch.equal(v.double(), p_pack[k]) for k, v in moved.engine.module.named_parameters())


def test_packed_step_with_one_token_responses_and_solved_groups(assets, tmp_path, float64):
    """Responses of length 1, and groups without a rejected rollout under both fallbacks."""
    for no_rejected in ("rlsd", "grpo"):
        kw = dict(
            algorithm__name="cepo", rollout__prompts_per_step=6, rollout__max_new_tokens=1, optim__micro_batch_size=8,
            algorithm__no_rejected=no_rejected, reward__functions=["tests.trainer.rewards:solved_by_question"],
        )  # fmt: skip
        _, m_pad, p_pad = two_steps(assets, str(tmp_path / f"pad-{no_rejected}"), scoring__packing="false", **kw)
        _, m_pack, p_pack = two_steps(assets, str(tmp_path / f"pack-{no_rejected}"), scoring__packing="true", **kw)
        assert m_pack[0]["response_length"] == 1.0
        assert 0.0 < m_pack[0]["cepo/no_rejected_frac"] < 1.0  # both kinds of group occurred
        compare_metrics(m_pad, m_pack, rel=1e-9)
        compare_params(p_pad, p_pack, atol=1e-10)


def test_packed_lora_step_equals_padded_float64(assets, tmp_path, float64):
    kw = dict(algorithm__name="cepo", rollout__prompts_per_step=4, optim__micro_batch_size=8, model__lora=True)
    _, m_pad, p_pad = two_steps(assets, str(tmp_path / "pad"), scoring__packing="false", model__lora_r=4, **kw)
    t_pack, m_pack, p_pack = two_steps(assets, str(tmp_path / "pack"), scoring__packing="true", model__lora_r=4, **kw)
    assert t_pack.packed and any("lora_A" in k for k in p_pack)
    compare_metrics(m_pad, m_pack, rel=1e-9)
    compare_params(p_pad, p_pack, atol=1e-10)


def test_packed_zero2_step_equals_padded_float32(assets, tmp_path):
    kw = dict(algorithm__name="cepo", rollout__prompts_per_step=4, optim__micro_batch_size=8, engine__zero_stage=2)
    t_pad, m_pad, p_pad = two_steps(assets, str(tmp_path / "pad"), scoring__packing="false", after_first=True, **kw)
    t_pack, m_pack, p_pack = two_steps(assets, str(tmp_path / "pack"), scoring__packing="true", after_first=True, **kw)
    assert t_pack.packed
    compare_metrics(m_pad, m_pack, rel=1e-4, abs_keys=("loss", "cepo/delta", "kl", "clip_frac"), atol=1e-5)
    worst = max((p_pad[k] - p_pack[k]).abs().max().item() for k in p_pad)
    assert worst > 0  # float32: the two paths do round differently
    compare_params(p_pad, p_pack, atol=ZERO2_ATOL)


def test_packing_true_never_runs_the_padded_forward(assets, tmp_path, monkeypatch):
    def padded(*a, **k):
        raise AssertionError("a padded forward ran with scoring.packing=true")

    monkeypatch.setattr(scoring_mod, "forward_logprobs", padded)
    monkeypatch.setattr(scoring_mod, "build_batch", padded)
    _, metrics, _ = two_steps(
        assets, str(tmp_path / "run"), algorithm__name="cepo", scoring__packing="true", optim__kl_coef=0.1
    )
    assert metrics[0]["tokens/experience"] > 0 and metrics[0]["tokens/update"] > 0


def test_packed_micro_batch_token_budget_does_not_change_the_step(assets, tmp_path, float64):
    kw = dict(algorithm__name="cepo", rollout__prompts_per_step=4, scoring__packing="true")
    _, m_one, p_one = two_steps(assets, str(tmp_path / "one"), optim__micro_batch_size=16, **kw)
    _, m_many, p_many = two_steps(assets, str(tmp_path / "many"), scoring__micro_batch_tokens=1, **kw)  # a group each
    compare_metrics(m_one, m_many, rel=1e-9)
    compare_params(p_one, p_many, atol=1e-10)


def test_packed_experience_runs_under_half_the_tokens_on_the_demo_geometry(assets, tmp_path):
    """The demo config's batch (32 prompts x 8 rollouts of up to 32 tokens, CEPO teachers on)."""
    cfg = load_config(
        make_config(
            assets, str(tmp_path / "demo"), algorithm__name="cepo", rollout__prompts_per_step=32,
            rollout__group_size=8, rollout__max_new_tokens=32, optim__micro_batch_size=128,
            algorithm__teacher_template="\nAnswer: {answer}\n", data__instruction="Answer in \\boxed{}.",
        )
    )  # fmt: skip
    trainer = Trainer(cfg)
    rollouts = trainer.generate(1)
    trainer.score_rewards(rollouts)
    packed = trainer.experience.score(trainer.engine.module, rollouts, 1.0)
    trainer.experience.passes = PaddedPasses(trainer.cfg, trainer.tokenizer.pad_token_id, "cpu", fused_head=True)
    padded = trainer.experience.score(trainer.engine.module, rollouts, 1.0)
    ratio = packed.stats["tokens/experience"] / padded.stats["tokens/experience"]
    assert ratio <= 0.5, ratio
    torch.testing.assert_close(packed.advantages, padded.advantages, rtol=1e-4, atol=1e-5)


def test_packing_on_an_unsupported_model(assets, tmp_path, caplog):
    import transformers

    out = str(tmp_path / "mistral")
    tok = transformers.AutoTokenizer.from_pretrained(assets["model"])
    dims = {k: v for k, v in TINY.items() if k != "head_dim"}
    transformers.MistralForCausalLM(transformers.MistralConfig(vocab_size=len(tok), **dims)).save_pretrained(out)
    tok.save_pretrained(out)
    other = {**assets, "model": out}
    with pytest.raises(ValueError, match="scoring.packing=true: tree attention supports"):
        Trainer(load_config(make_config(other, str(tmp_path / "t"), scoring__packing="true")))
    with caplog.at_level("INFO", logger="cepo.scoring"):
        trainer = Trainer(load_config(make_config(other, str(tmp_path / "a"))))
    assert not trainer.packed and "scoring.packing=auto: using padded passes" in caplog.text
    assert math.isfinite(trainer.step(1)["loss"])


def test_rollout_keeps_sdpa_and_scoring_uses_tree_attention(assets, tmp_path, monkeypatch):
    trainer = Trainer(load_config(make_config(assets, str(tmp_path / "run"), scoring__packing="true")))
    seen = []
    real = scoring_mod.packed_forward

    def spy(model, table, **kw):
        seen.append(model.config._attn_implementation)
        return real(model, table, **kw)

    monkeypatch.setattr(scoring_mod, "packed_forward", spy)
    trainer.step(1)
    assert seen and set(seen) == {"cepo_tree"}
    assert trainer.engine.module.config._attn_implementation == "sdpa"  # generate's implementation is back


def test_packing_config_values(assets, tmp_path):
    assert load_config(make_config(assets, str(tmp_path / "a"), scoring__packing=True)).scoring.packing == "true"
    with pytest.raises(ValueError, match="scoring.packing"):
        load_config(make_config(assets, str(tmp_path / "b"), scoring__packing="sometimes"))
    for old, new in (("packing", "scoring.packing"), ("logprob_backend", "scoring.kernel_backend")):
        with pytest.raises(ValueError, match=f"'optim.{old}'.*moved to {new}"):
            load_config(make_config(assets, str(tmp_path / "c"), **{f"optim__{old}": "auto"}))
    with pytest.raises(ValueError, match="'optim.fused_head'.*removed"):
        load_config(make_config(assets, str(tmp_path / "d"), optim__fused_head=True))
    assert os.path.isdir(assets["model"])
