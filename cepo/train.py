"""The RL loop: GRPO, RLSD or CEPO on DeepSpeed.

For each RL step ``k = 1 .. steps`` (:meth:`Trainer.step`, four calls):

1. **Rollout** (:meth:`Trainer.generate`). Take the next ``prompts_per_step`` prompts (each rank
   its share) and sample ``G = group_size`` responses per prompt with the current policy.
2. **Reward** (:meth:`Trainer.score_rewards`). Score each response (math-verify, format, user
   functions).
3. **Score** (:meth:`cepo.experience.Experience.score`). GRPO: ``A_i = (r_i - mean_g) / (std_g +
   eps)`` per group and the old policy's log-probs. With ``lam = lam_at(k) > 0``, RLSD and CEPO
   also score each response under a teacher context ``[prompt, teacher_template(r+), response]``
   (``r+`` = ground truth) and a negative context (RLSD: the old policy itself; CEPO:
   ``[prompt, teacher_template(r-), response]`` with ``r-`` the answer of the group's
   lowest-scoring rejected rollout), and reweight:
   ``A_t = A * (1 + lam * (clip(exp(sign(A) * delta_t), 1 +- eps_w) - 1))``. Packed (default):
   one shared-prefix forward per micro-batch of groups and one fused three-way LM-head call.
4. **Update** (:meth:`Trainer.update`). ``updates_per_batch`` optimizer steps of the PPO-clipped
   loss over mini-batches of the rollouts (``old_logp`` = the policy's log-probs before the first
   update), with gradient accumulation over micro-batches (packed: whole groups, each prompt
   encoded once) and a loss normalised over the whole mini-batch on all ranks.

Every ``save_every`` steps a checkpoint; every ``eval_every`` steps held-out accuracy; metrics to
``metrics.jsonl`` each step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from cepo import checkpoint as ckpt
from cepo import vision
from cepo.advantages import lam_at
from cepo.config import TrainConfig, load_config, save_config, to_dict
from cepo.data import PromptStream, load_examples
from cepo.engine import build_engine, load_policy, setup_distributed, skipped_steps
from cepo.evaluate import accuracy
from cepo.experience import Experience, Rollouts, Scored
from cepo.loss import ppo_loss, tis_weights
from cepo.paths import check_train_paths
from cepo.reward import RewardModel
from cepo.rollout import build_rollout_backend, logprob_diff_metrics, logprobs_tensor
from cepo.samples import should_log, step_records, write_samples
from cepo.scoring import build_passes

log = logging.getLogger("cepo.train")


@contextmanager
def timed(timings: dict, name: str):
    """Adds the body's wall time to ``time/<name>`` and its process CPU time (all threads) to
    ``cpu_time/<name>``: on a shared machine the wall time mostly tracks the load, the CPU time the work."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    timings[f"time/{name}"] = timings.get(f"time/{name}", 0.0) + time.perf_counter() - t0
    timings[f"cpu_time/{name}"] = timings.get(f"cpu_time/{name}", 0.0) + time.process_time() - c0


class MetricsLog:
    """JSONL metrics (rank 0), plus optional TensorBoard and Weights & Biases."""

    def __init__(self, cfg: TrainConfig, path: str, resume_step: int, enabled: bool):
        self.path, self.enabled, self.tb, self.wandb = path, enabled, None, None
        if not enabled:
            return
        if resume_step and os.path.isfile(path):  # drop lines logged after the checkpoint we resume from
            kept = [line for line in open(path) if json.loads(line).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(kept)
        elif os.path.isfile(path):
            os.remove(path)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, config=to_dict(cfg), resume="allow")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in numeric.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(numeric, step=record["step"])


def _gather_mean(metrics: dict) -> dict:
    """Mean of each metric over ranks (the maximum for ``*_max`` metrics), ignoring NaN (a rank
    with no wrong rollouts, ...)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, metrics)
    out = {}
    for k in metrics:
        vals = [g[k] for g in gathered if isinstance(g.get(k), (int, float)) and not math.isnan(g[k])]
        reduce = np.max if k.endswith("_max") else np.mean
        out[k] = float(reduce(vals)) if vals else float("nan")
    return out


def _grad_norm(module) -> float:
    """Global L2 norm of the (already all-reduced) gradients, before clipping (ZeRO stage 0)."""
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else float("nan")


class Trainer:
    """Set-up (``__init__``), one RL step (:meth:`step`), the loop (:meth:`fit`)."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        self.cfg = cfg
        check_train_paths(cfg)  # one clear error before transformers reads a missing path as a hub repo id
        self.rank, self.world, self.device = setup_distributed(cfg.engine.dist_backend, cfg.engine.dist_timeout_s)
        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.processor = vision.processor_for(cfg)  # VL models: images onto the patch grid; None for text
        self.examples, self.dropped = load_examples(cfg.data.train_file, self.tokenizer, cfg.data, self.processor)
        self.eval_examples = []
        if cfg.data.eval_file:
            self.eval_examples, _ = load_examples(cfg.data.eval_file, self.tokenizer, cfg.data, self.processor)
            self.eval_examples = self.eval_examples[: cfg.data.eval_limit or None]
        self.reward = RewardModel(cfg.reward)

        # Batch geometry: each rank holds P/W prompts x G rollouts per RL step.
        p, g, w = cfg.rollout.prompts_per_step, cfg.rollout.group_size, self.world
        if p % w:
            raise ValueError(f"rollout.prompts_per_step={p} must be divisible by the world size {w}")
        self.prompts_per_rank = p // w
        rows = self.prompts_per_rank * g
        if rows % cfg.optim.updates_per_batch:
            raise ValueError(
                f"{rows} rollouts per rank are not divisible by optim.updates_per_batch={cfg.optim.updates_per_batch}"
            )
        self.mini_rows = rows // cfg.optim.updates_per_batch

        model = load_policy(cfg)
        # Packed passes (shared prompts, tree attention) where the model supports them; else padded.
        passes = build_passes(cfg, model, self.tokenizer.pad_token_id, self.device, self.prompts_per_rank)
        self.packed = passes.packed
        if not self.packed and self.mini_rows % cfg.optim.micro_batch_size:
            raise ValueError(
                f"a mini-batch of {self.mini_rows} rollouts per rank is not divisible by "
                f"optim.micro_batch_size={cfg.optim.micro_batch_size}"
            )
        # micro-batches per mini-batch (padded: fixed; packed: whole groups, agreed across ranks each step)
        per_micro = cfg.optim.micro_batch_size if not self.packed else max(1, cfg.optim.micro_batch_size // g) * g
        self.grad_accum = max(1, math.ceil(self.mini_rows / per_micro))
        self.engine, self.optimizer = build_engine(
            model, cfg, total_optimizer_steps=cfg.steps * cfg.optim.updates_per_batch, grad_accum=self.grad_accum
        )
        self.ref_model = None
        if cfg.optim.kl_coef > 0:
            self.ref_model = load_policy(cfg, for_training=False).to(self.device).eval().requires_grad_(False)
        self.synced = cfg.engine.zero_stage == 3 and self.world > 1
        # transformers' generate on the policy itself, or a colocated vLLM engine (rollout.backend)
        self.rollout = build_rollout_backend(cfg, self.engine.module, self.tokenizer, self.device, self.synced)
        self.experience = Experience(cfg, self.tokenizer, self.device, passes)
        self.stream = PromptStream(len(self.examples), cfg.seed)
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        self.step_done = 0
        self.totals = {"reward_errors": 0, "reward_timeouts": 0}
        self.evals: list[tuple[int, float]] = []
        if resume:
            path = ckpt.latest(self.ckpt_root)
            if path is None:
                log.warning("--resume: no complete checkpoint under %s; starting from step 0", self.ckpt_root)
            else:
                meta = ckpt.load(self.engine, path)
                self.step_done = meta["step"]
                self.stream.load_state(meta["data"])
                self.totals = meta["totals"]
                self.evals = [tuple(e) for e in meta["evals"]]
                log.info("resumed from %s (step %d)", path, self.step_done)
        if self.rank == 0:
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        self.metrics = MetricsLog(cfg, os.path.join(cfg.output_dir, "metrics.jsonl"), self.step_done, self.rank == 0)
        self.rollout.sync_weights(self.engine.module)  # vLLM: the policy as loaded (or resumed) before step 1

    # ------------------------------------------------------------------ one RL step
    def step(self, k: int) -> dict:
        """RL step ``k`` (1-based): rollout, reward, score, update. Returns this rank's metrics."""
        acfg, t = self.cfg.algorithm, {}
        with timed(t, "rollout"):
            rollouts = self.generate(k)
        with timed(t, "reward"):
            rstats = self.score_rewards(rollouts)
        lam = lam_at(k, acfg.lam, acfg.lam_schedule, acfg.lam_decay_steps) if acfg.name != "grpo" else 0.0
        with timed(t, "experience"):
            scored = self.experience.score(self.engine.module, rollouts, lam, ref_model=self.ref_model)
        if self.rank == 0 and should_log(k, self.cfg.log_samples_every):  # what this step computed, for cepo viz
            records = vision.records_with_images(step_records(k, self.cfg, self.tokenizer, rollouts, scored), rollouts)
            write_samples(self.cfg.output_dir, k, records)
        with timed(t, "update"):
            m = self.update(rollouts, scored)
        with timed(t, "weight_sync"):  # vLLM: push the updated weights before the next rollout (raises if it fails)
            self.rollout.sync_weights(self.engine.module)
        samp = logprobs_tensor(rollouts.sampler_logprobs, scored.old_logp.shape[1])
        if samp is not None:  # rollout/logprob_diff(_max): |sampler - trainer old log-prob| over response tokens
            m.update(logprob_diff_metrics(scored.old_logp, samp, scored.mask))
        m.update({**scored.stats, **rstats, **t, "lam": lam})
        if rollouts.vision is not None:  # patches through the vision tower this step (all passes)
            m["tokens/vision"] = rollouts.vision.patches
        G = rollouts.group_size
        m["reward"] = rollouts.rewards.mean().item()
        m["response_length"] = scored.mask.sum(-1).float().mean().item()
        solved = rollouts.rewards.view(-1, G).max(-1).values >= acfg.reject_threshold
        m["solved_groups_frac"] = solved.float().mean().item()
        return m

    def generate(self, k: int) -> Rollouts:
        """This rank's share of the step's prompts, ``G`` samples each."""
        cfg, G = self.cfg, self.cfg.rollout.group_size
        idx = self.stream.next(cfg.rollout.prompts_per_step)
        mine = [
            self.examples[i] for i in idx[self.rank * self.prompts_per_rank : (self.rank + 1) * self.prompts_per_rank]
        ]
        images = vision.examples_images(mine, self.processor, cfg.data)  # VL: per prompt (None: text)
        samples = self.rollout.generate(
            [ex.prompt_ids for ex in mine], G, seed=cfg.seed * 1_000_003 + k * 7919 + self.rank,
            **({} if images is None else {"images": images}),
        )  # fmt: skip
        return Rollouts(
            prompts=[list(ex.prompt_ids) for ex in mine],
            responses=samples.tokens,
            texts=self.tokenizer.batch_decode(samples.tokens, skip_special_tokens=True),
            answers=[ex.answer for ex in mine],
            questions=[ex.question for ex in mine],
            group_size=G,
            sampler_logprobs=samples.logprobs,
            vision=vision.step_vision(self.engine.module, images, [ex.images for ex in mine]),
        )

    def score_rewards(self, rollouts: Rollouts) -> dict:
        """Sets ``rollouts.rewards``; returns the reward statistics."""
        answers, questions = rollouts.per_rollout(rollouts.answers), rollouts.per_rollout(rollouts.questions)
        rewards, stats = self.reward(rollouts.texts, answers, questions)
        rollouts.rewards = torch.tensor(rewards, dtype=torch.float32)
        return stats

    def update(self, rollouts: Rollouts, scored: Scored) -> dict:
        """``updates_per_batch`` optimizer steps of the PPO loss; loss sums are normalised globally.

        Each mini-batch's micro-batches come from the scorer (packed: whole groups, the same count on
        every rank); the accumulation boundary is set explicitly, so that count may vary by step.
        """
        cfg, engine = self.cfg.optim, self.engine
        engine.train()
        sums = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "tokens": 0.0, "entropy": 0.0, "decoder": 0}
        grad_norms = []
        mini = self.mini_rows
        isw = None  # rollout.tis_cap: truncated importance weights min(exp(old - sampler), C)
        samp = logprobs_tensor(rollouts.sampler_logprobs, scored.old_logp.shape[1])
        if self.cfg.rollout.tis_cap is not None and samp is not None:
            isw = tis_weights(scored.old_logp, samp, scored.mask, self.cfg.rollout.tis_cap)
        for u in range(cfg.updates_per_batch):
            rows = slice(u * mini, (u + 1) * mini)
            count = torch.tensor(
                [scored.mask[rows].sum().item() if cfg.loss_agg == "token_mean" else float(mini)],
                dtype=torch.float64,
                device=self.device,
            )
            if dist.is_initialized():
                dist.all_reduce(count)
            normalizer = count.item()
            micro = self.experience.micro_batches(rollouts, rows)
            for j, mb in enumerate(micro):
                logp, entropy, mask = self.experience.policy_logprobs(engine, mb)
                sl = mb.rows
                loss, st = ppo_loss(
                    logp,
                    scored.old_logp[sl].to(self.device),
                    scored.advantages[sl].to(self.device),
                    mask,
                    normalizer=normalizer,
                    clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high,
                    dual_clip=cfg.dual_clip,
                    loss_agg=cfg.loss_agg,
                    ref_logp=None if scored.ref_logp is None else scored.ref_logp[sl].to(self.device),
                    kl_coef=cfg.kl_coef,
                    **({} if isw is None else {"is_weights": isw[sl].to(self.device)}),
                )
                # DeepSpeed averages gradients over ranks: scale back to the global sum / normalizer.
                engine.set_gradient_accumulation_boundary(j == len(micro) - 1)
                engine.backward(loss * self.world, scale_wrt_gas=False)
                if j == len(micro) - 1 and self.cfg.engine.zero_stage == 0:
                    grad_norms.append(_grad_norm(engine.module))
                engine.step()
                sums["loss"] += loss.item()
                sums["entropy"] += (entropy.detach() * mask).sum().item()
                sums["decoder"] += mb.tokens
                for key in ("clipped", "kl", "tokens"):
                    sums[key] += st[key].item()
            if self.cfg.engine.zero_stage > 0 and engine.get_global_grad_norm() is not None:
                grad_norms.append(float(engine.get_global_grad_norm()))
        tokens = max(1.0, sums["tokens"])
        return {
            "loss": sums["loss"] * self.world / cfg.updates_per_batch,  # the mean over ranks is the global loss
            "clip_frac": sums["clipped"] / tokens,
            "kl": sums["kl"] / tokens,
            "entropy": sums["entropy"] / tokens,
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
            "lr": engine.get_lr()[0],
            "tokens/update": sums["decoder"],
        }

    # ------------------------------------------------------------------ the loop
    def evaluate(self) -> float:
        return accuracy(
            self.engine.module,
            self.tokenizer,
            self.eval_examples,
            self.cfg.rollout,
            device=self.device,
            timeout_s=self.cfg.reward.timeout_s,
            synced_gpus=self.synced,
            images=vision.examples_images(self.eval_examples, self.processor, self.cfg.data),
        )

    def save(self, k: int) -> None:
        meta = {"data": self.stream.state(), "totals": self.totals, "evals": self.evals, "config": to_dict(self.cfg)}
        ckpt.save(self.engine, self.tokenizer, self.ckpt_root, k, meta, keep=self.cfg.keep_checkpoints)

    def fit(self) -> dict:
        cfg = self.cfg
        if self.eval_examples and self.step_done == 0:
            self.evals.append((0, self.evaluate()))
            self.metrics.write({"step": 0, "eval/accuracy": self.evals[-1][1]})
        bar = None
        if self.rank == 0 and cfg.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step_done, desc=f"{cfg.algorithm.name}", dynamic_ncols=True)
        for k in range(self.step_done + 1, cfg.steps + 1):
            m = _gather_mean(self.step(k))
            for key in ("tokens/experience", "tokens/update"):  # summed over ranks
                m[key] = int(round(m[key] * self.world))
            self.totals["reward_errors"] += int(round(m.pop("reward_errors") * self.world))
            self.totals["reward_timeouts"] += int(round(m.pop("reward_timeouts") * self.world))
            record = {
                "step": k,
                **m,
                **self.totals,
                "skipped_steps": skipped_steps(self.engine, self.optimizer),
                "dropped_prompts": self.dropped,
            }
            last = k == cfg.steps
            if self.eval_examples and (last or (cfg.eval_every and k % cfg.eval_every == 0)):
                self.evals.append((k, self.evaluate()))
                record["eval/accuracy"] = self.evals[-1][1]
            self.metrics.write(record)
            if bar is not None:
                post = {"reward": f"{m['reward']:.3f}", "lam": f"{m['lam']:.2f}"}
                if "eval/accuracy" in record:
                    post["acc"] = f"{record['eval/accuracy']:.3f}"
                bar.set_postfix(post)
                bar.update(1)
            self.step_done = k
            if last or (cfg.save_every and k % cfg.save_every == 0):
                self.save(k)
        if bar is not None:
            bar.close()
        final = os.path.join(cfg.output_dir, "final")
        ckpt.save_hf(self.engine, self.tokenizer, final)
        if self.processor is not None and self.rank == 0:  # VL: the image processor config travels with the model
            vision.copy_processor_config(self.cfg.model.path, final)
        return {
            "evals": self.evals,
            "steps": self.step_done,
            "metrics_file": self.metrics.path,
            "final_model": final,
            **self.totals,
        }


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run training to ``cfg.steps``; returns a summary (evals, paths, counts)."""
    return Trainer(cfg, resume=resume).fit()


def run_from_config(path: str | None, overrides: list[str] = (), *, resume: bool = False) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return train(load_config(path, overrides), resume=resume)
