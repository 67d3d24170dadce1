"""The RL loop: GRPO, RLSD or CEPO on DeepSpeed.

For each RL step ``k = 1 .. steps``:

1. **Rollout.** Take the next ``prompts_per_step`` prompts (each rank its share) and sample
   ``G = group_size`` responses per prompt with the current policy.
2. **Reward.** Score each response (math-verify, format, user functions).
3. **Advantages.** GRPO: ``A_i = (r_i - mean_g) / (std_g + eps)`` per group. With
   ``lam = lam_at(k) > 0``, RLSD and CEPO compute per-token log-probs of each response under a
   teacher context ``[prompt, teacher_template(r+), response]`` (``r+`` = ground truth) and under
   a negative context (RLSD: the old policy itself; CEPO: ``[prompt, teacher_template(r-),
   response]`` with ``r-`` the answer of the group's lowest-scoring rejected rollout), and
   reweight: ``A_t = A * (1 + lam * (clip(exp(sign(A) * delta_t), 1 +- eps_w) - 1))``.
4. **Update.** ``updates_per_batch`` optimizer steps of the PPO-clipped loss over mini-batches of
   the rollouts (``old_logp`` = the policy's log-probs before the first update), with gradient
   accumulation over micro-batches and a loss normalised over the whole mini-batch on all ranks.
5. Every ``save_every`` steps a checkpoint; every ``eval_every`` steps held-out accuracy; metrics
   to ``metrics.jsonl`` each step.
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
from cepo.advantages import contrastive_token_advantages, delta_diagnostics, grpo_advantages, lam_at, select_negatives
from cepo.config import TrainConfig, load_config, save_config, to_dict
from cepo.data import PromptStream, load_examples
from cepo.engine import build_engine, load_policy, setup_distributed, skipped_steps
from cepo.evaluate import accuracy
from cepo.logprobs import batched_logprobs, build_batch, forward_logprobs
from cepo.loss import ppo_loss
from cepo.reward import RewardModel
from cepo.rollout import HFGenerateBackend

log = logging.getLogger("cepo.train")


@contextmanager
def timed(timings: dict, name: str):
    t0 = time.perf_counter()
    yield
    timings[f"time/{name}"] = timings.get(f"time/{name}", 0.0) + time.perf_counter() - t0


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
    """Mean of each metric over ranks, ignoring NaN (a rank with no wrong rollouts, ...)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, metrics)
    out = {}
    for k in metrics:
        vals = [g[k] for g in gathered if isinstance(g.get(k), (int, float)) and not math.isnan(g[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def _grad_norm(module) -> float:
    """Global L2 norm of the (already all-reduced) gradients, before clipping (ZeRO stage 0)."""
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else float("nan")


class Trainer:
    """Set-up (``__init__``), one RL step (:meth:`step`), the loop (:meth:`fit`)."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed(cfg.engine.dist_backend)
        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.examples, self.dropped = load_examples(cfg.data.train_file, self.tokenizer, cfg.data)
        self.eval_examples = []
        if cfg.data.eval_file:
            self.eval_examples, _ = load_examples(cfg.data.eval_file, self.tokenizer, cfg.data)
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
        if self.mini_rows % cfg.optim.micro_batch_size:
            raise ValueError(
                f"a mini-batch of {self.mini_rows} rollouts per rank is not divisible by "
                f"optim.micro_batch_size={cfg.optim.micro_batch_size}"
            )
        self.grad_accum = self.mini_rows // cfg.optim.micro_batch_size

        model = load_policy(cfg)
        self.engine, self.optimizer = build_engine(
            model, cfg, total_optimizer_steps=cfg.steps * cfg.optim.updates_per_batch, grad_accum=self.grad_accum
        )
        self.ref_model = None
        if cfg.optim.kl_coef > 0:
            self.ref_model = load_policy(cfg, for_training=False).to(self.device).eval().requires_grad_(False)
        self.synced = cfg.engine.zero_stage == 3 and self.world > 1
        self.rollout = HFGenerateBackend(
            self.engine.module, self.tokenizer, cfg.rollout, device=self.device, synced_gpus=self.synced
        )
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

    # ------------------------------------------------------------------ one RL step
    def logprobs(self, model, contexts, responses, width):
        """``(B, width)`` no-grad log-probs of ``responses`` after ``contexts``."""
        return self.batch_logprobs(
            model, build_batch(contexts, responses, self.tokenizer.pad_token_id, response_width=width)
        )

    def batch_logprobs(self, model, batch):
        return batched_logprobs(
            model,
            batch,
            micro_batch_size=self.cfg.optim.micro_batch_size,
            temperature=self.cfg.rollout.temperature,
            backend=self.cfg.optim.logprob_backend,
            device=self.device,
            fused_head=self.cfg.optim.fused_head,
        )

    def teacher_ids(self, answer: str) -> list[int]:
        text = self.cfg.algorithm.teacher_template.format(answer=answer)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def negative_logprobs(self, rows, contexts, responses, width, rewards, texts, old_logp, pos):
        """``(B, R)`` log-probs under the negative context, and CEPO's selection statistics.

        RLSD: the old policy's own log-probs. CEPO: ``[prompt, teacher_template(r-), response]``
        per group (see :mod:`cepo.advantages` for the fallbacks).
        """
        acfg, G = self.cfg.algorithm, self.cfg.rollout.group_size
        neg = old_logp.clone()  # RLSD, and CEPO's fallback
        if acfg.name != "cepo":
            return neg, {}
        choices = select_negatives(rewards, texts, G, acfg.reject_threshold)
        need = [i for i in range(len(rows)) if choices[i // G].reason == "ok"]
        if need:
            neg_ctx = [contexts[i] + self.teacher_ids(choices[i // G].answer) for i in need]
            neg[need] = self.logprobs(self.engine.module, neg_ctx, [responses[i] for i in need], width)
        if acfg.no_rejected == "grpo":
            same = [i for i in range(len(rows)) if choices[i // G].reason == "no_rejected"]
            neg[same] = pos[same]  # delta = 0: A_t = A exactly
        with_rejected = sum(c.reason != "no_rejected" for c in choices)
        return neg, {
            "cepo/no_rejected_frac": sum(c.reason == "no_rejected" for c in choices) / len(choices),
            "cepo/no_answer_frac": sum(c.reason == "no_answer" for c in choices) / with_rejected
            if with_rejected
            else 0.0,
        }

    def step(self, k: int) -> dict:
        """RL step ``k`` (1-based): rollout, reward, advantages, update. Returns this rank's metrics."""
        cfg, acfg, G = self.cfg, self.cfg.algorithm, self.cfg.rollout.group_size
        t: dict = {}
        idx = self.stream.next(cfg.rollout.prompts_per_step)
        mine = [
            self.examples[i] for i in idx[self.rank * self.prompts_per_rank : (self.rank + 1) * self.prompts_per_rank]
        ]

        with timed(t, "rollout"):
            responses = self.rollout.generate(
                [ex.prompt_ids for ex in mine], G, seed=cfg.seed * 1_000_003 + k * 7919 + self.rank
            )
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        rows = [ex for ex in mine for _ in range(G)]
        with timed(t, "reward"):
            rewards_list, rstats = self.reward(texts, [ex.answer for ex in rows], [ex.question for ex in rows])
        rewards = torch.tensor(rewards_list, dtype=torch.float32)
        seq_adv = grpo_advantages(rewards, G, acfg.scale_by_std)

        contexts = [ex.prompt_ids for ex in rows]
        width = max(1, max(len(r) for r in responses))
        batch = build_batch(contexts, responses, self.tokenizer.pad_token_id, response_width=width)
        mask = batch.mask
        with timed(t, "logprob_old"):
            old_logp = self.batch_logprobs(self.engine.module, batch)
        ref_logp = None
        if self.ref_model is not None:
            with timed(t, "logprob_ref"):
                ref_logp = self.batch_logprobs(self.ref_model, batch)

        lam = lam_at(k, acfg.lam, acfg.lam_schedule, acfg.lam_decay_steps) if acfg.name != "grpo" else 0.0
        m: dict = {"lam": lam}
        if lam > 0:  # teacher passes run only when they can change the advantages
            with timed(t, "logprob_teacher"):
                pos = self.logprobs(
                    self.engine.module,
                    [c + self.teacher_ids(ex.answer) for c, ex in zip(contexts, rows)],
                    responses,
                    width,
                )
                neg, nstats = self.negative_logprobs(
                    rows, contexts, responses, width, rewards_list, texts, old_logp, pos
                )
                m.update(nstats)
            tok_adv, weights = contrastive_token_advantages(
                seq_adv, pos, neg, mask, lam=lam, eps_w=acfg.eps_w, backend=cfg.optim.logprob_backend
            )
            m.update(delta_diagnostics(seq_adv, rewards, pos, neg, mask, weights, acfg.eps_w, acfg.reject_threshold))
        else:
            tok_adv = torch.where(mask, seq_adv[:, None].expand_as(mask), torch.zeros(()))

        with timed(t, "update"):
            m.update(self.update(batch, old_logp, tok_adv, ref_logp))

        m.update(rstats)
        m.update(t)
        m["reward"] = rewards.mean().item()
        m["response_length"] = mask.sum(-1).float().mean().item()
        m["solved_groups_frac"] = (rewards.view(-1, G).max(-1).values >= acfg.reject_threshold).float().mean().item()
        return m

    def update(self, batch, old_logp, tok_adv, ref_logp) -> dict:
        """``updates_per_batch`` optimizer steps of the PPO loss; loss sums are normalised globally."""
        cfg, engine = self.cfg.optim, self.engine
        engine.train()
        sums = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "tokens": 0.0, "entropy": 0.0}
        grad_norms = []
        for u in range(cfg.updates_per_batch):
            rows = slice(u * self.mini_rows, (u + 1) * self.mini_rows)
            count = torch.tensor(
                [batch.mask[rows].sum().item() if cfg.loss_agg == "token_mean" else float(self.mini_rows)],
                dtype=torch.float64,
                device=self.device,
            )
            if dist.is_initialized():
                dist.all_reduce(count)
            normalizer = count.item()
            # DeepSpeed divides each micro-batch loss by grad_accum and averages gradients over ranks.
            scale = self.grad_accum * self.world
            for j in range(self.grad_accum):
                r0 = u * self.mini_rows + j * cfg.micro_batch_size
                sl = slice(r0, r0 + cfg.micro_batch_size)
                mb = batch.rows(sl).to(self.device)
                logp, entropy = forward_logprobs(
                    engine,
                    mb,
                    temperature=self.cfg.rollout.temperature,
                    backend=cfg.logprob_backend,
                    return_entropy=True,
                    fused_head=cfg.fused_head,
                )
                loss, st = ppo_loss(
                    logp,
                    old_logp[sl].to(self.device),
                    tok_adv[sl].to(self.device),
                    mb.mask,
                    normalizer=normalizer,
                    clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high,
                    dual_clip=cfg.dual_clip,
                    loss_agg=cfg.loss_agg,
                    ref_logp=None if ref_logp is None else ref_logp[sl].to(self.device),
                    kl_coef=cfg.kl_coef,
                )
                engine.backward(loss * scale)
                if j == self.grad_accum - 1 and self.cfg.engine.zero_stage == 0:
                    grad_norms.append(_grad_norm(engine.module))
                engine.step()
                sums["loss"] += loss.item()
                sums["entropy"] += (entropy.detach() * mb.mask).sum().item()
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
