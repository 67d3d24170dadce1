"""One VL experience pass, packed against padded, on the same rollouts (CPU time, decoder tokens, vision patches).

``python -m bench.bench_vision_experience runs/demo-vision`` after ``python -m cepo.demo --task vision
--out runs/demo-vision`` (or ``--skip-train``): the demo config's batch (16 prompts x 8 rollouts, CEPO
teachers on) for ``algorithm.teacher_image`` keep and drop; prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from cepo.config import load_config
from cepo.scoring import PackedPasses, PaddedPasses
from cepo.train import Trainer


def main(assets: str) -> dict:
    torch.set_num_threads(1)
    cfg = load_config(
        "configs/demo_vision.yaml",
        [f"model.path={assets}/base_model", f"data.train_file={assets}/train.parquet", "data.eval_file=null",
         f"output_dir={assets}/bench", "progress_bar=false"],
    )  # fmt: skip
    trainer = Trainer(cfg)
    out = {}
    for mode in ("keep", "drop"):
        trainer.cfg.algorithm.teacher_image = mode
        rollouts = trainer.generate(1)
        trainer.score_rewards(rollouts)
        res = {}
        for name, passes in (
            ("packed", PackedPasses(trainer.cfg, trainer.tokenizer.pad_token_id, "cpu")),
            ("padded", PaddedPasses(trainer.cfg, trainer.tokenizer.pad_token_id, "cpu", fused_head=True)),
        ):
            trainer.experience.passes = passes
            before = rollouts.vision.patches
            c0 = time.process_time()
            scored = trainer.experience.score(trainer.engine.module, rollouts, 1.0)
            res[name] = (scored, time.process_time() - c0, rollouts.vision.patches - before)
        (p, tp, vp), (q, tq, vq) = res["packed"], res["padded"]
        out[mode] = {
            "tokens_packed": p.stats["tokens/experience"], "tokens_padded": q.stats["tokens/experience"],
            "cpu_s_packed": round(tp, 3), "cpu_s_padded": round(tq, 3),
            "vision_patches_packed": vp, "vision_patches_padded": vq,
            "max_abs_diff_A_t": (p.advantages - q.advantages).abs().max().item(),
        }  # fmt: skip
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo-vision"), indent=1))
