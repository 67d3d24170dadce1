"""``python -m tests.trainer.vllm_worker CONFIG DUMP [--resume]``: ``cepo train`` with every vLLM
rollout (seed, prompts, responses, sampler log-probs) appended to ``DUMP`` as a JSON line."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    config, dump, *rest = argv
    from cepo import rollout_vllm

    generate = rollout_vllm.VLLMBackend.generate

    def recorded(self, prompts, n, seed, **kw):
        out = generate(self, prompts, n, seed, **kw)
        with open(dump, "a") as f:
            f.write(json.dumps({"seed": seed, "prompts": prompts, "responses": out.tokens, "logprobs": out.logprobs}))
            f.write("\n")
        return out

    rollout_vllm.VLLMBackend.generate = recorded
    from cepo.train import run_from_config

    run_from_config(config, [], resume="--resume" in rest)


if __name__ == "__main__":
    main(sys.argv[1:])
