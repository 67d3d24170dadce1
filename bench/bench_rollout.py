"""Rollout time of the demo config: vLLM (``rollout.backend=vllm``) vs transformers' ``generate``
(``hf``), side by side in one process.

``python -m bench.bench_rollout [--demo-dir runs/demo] [--repeats 5] [--out DIR]``

The demo's warm-started 0.8M-parameter Qwen3 and ``configs/demo.yaml`` (32 prompts x 8 samples,
temperature 1, at most 32 new tokens, ``generation_batch_size`` 256), built under ``--demo-dir``
if missing. Each repeat samples the next 32 prompts of the training stream with both backends, in
alternating order (the machine's load drifts; this keeps it fair): for vLLM a weight sync (as
the trainer does after every update) and ``generate``, for ``hf`` ``generate``. The trainer's
thread count (``--threads``, default all cores) is used for both, as in training, unless
``--vllm-threads`` sets ``rollout.vllm_threads`` (vLLM's threads while it samples). Prints the
median and best of each, tokens per second, the engine's build time and the speed-up; appends
one JSON line per measurement to ``DIR/bench_rollout.jsonl``. On a GPU the same code runs on
``cuda`` (fp32 weights, as the demo trains).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default="runs/demo", help="demo assets (built if missing)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vllm-threads", type=int, default=None, help="rollout.vllm_threads (default: --threads)")
    p.add_argument("--out", default=None, help="directory for bench_rollout.jsonl")
    p.add_argument("--quick", action="store_true", help="(bench.run_all) 2 repeats")
    args, _ = p.parse_known_args(argv)
    if args.quick:
        args.repeats = 2
    from cepo.rollout_vllm import vllm_available

    why = vllm_available()
    if why is not None:
        print(f"bench_rollout: vLLM not importable ({why}); `make install-vllm`")
        return 0
    torch.set_num_threads(args.threads)
    from cepo import demo
    from cepo.config import load_config
    from cepo.data import PromptStream, load_examples
    from cepo.engine import setup_distributed
    from cepo.rollout import HFGenerateBackend
    from cepo.rollout_vllm import VLLMBackend

    if not os.path.isfile(os.path.join(args.demo_dir, "base_model", "config.json")):
        print(f"building the demo assets under {args.demo_dir} ...", flush=True)
        demo.build_assets(args.demo_dir)
    model_dir = os.path.join(args.demo_dir, "base_model")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(
        os.path.join(root, "configs", "demo.yaml"),
        [f"model.path={model_dir}", f"data.train_file={os.path.join(args.demo_dir, 'train.jsonl')}"],
    )
    _, _, device = setup_distributed()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    examples, _ = load_examples(cfg.data.train_file, tok, cfg.data)
    stream = PromptStream(len(examples), cfg.seed)
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    cfg.rollout.vllm_threads = args.vllm_threads

    t0 = time.perf_counter()
    vb = VLLMBackend(
        model_dir,
        tok,
        cfg.rollout,
        max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
        device=device,
        model=model,
    )
    build = time.perf_counter() - t0
    threads_after_build = torch.get_num_threads()
    hb = HFGenerateBackend(model, tok, cfg.rollout, device=device)

    def run_vllm(prompts, seed):
        t = time.perf_counter()
        vb.sync_weights(model)
        t_sync = time.perf_counter() - t
        out = vb.generate(prompts, G, seed)
        return out, time.perf_counter() - t, t_sync

    def run_hf(prompts, seed):
        t = time.perf_counter()
        out = hb.generate(prompts, G, seed)
        return out, time.perf_counter() - t, 0.0

    # warm-up (first calls allocate)
    warm = [examples[i].prompt_ids for i in stream.next(P)]
    run_vllm(warm, 0)
    run_hf(warm, 0)
    times: dict[str, list] = {"vllm": [], "hf": []}
    syncs, tokens = [], {"vllm": [], "hf": []}
    records = []
    for r in range(args.repeats):
        prompts = [examples[i].prompt_ids for i in stream.next(P)]
        order = [("vllm", run_vllm), ("hf", run_hf)] if r % 2 == 0 else [("hf", run_hf), ("vllm", run_vllm)]
        for name, fn in order:
            out, dt, ts = fn(prompts, 1000 + r)
            n_tok = sum(map(len, out))
            times[name].append(dt)
            tokens[name].append(n_tok)
            if name == "vllm":
                syncs.append(ts)
            records.append(
                dict(bench="rollout", backend=name, repeat=r, seconds=dt, sync_seconds=ts, tokens=n_tok, rows=P * G)
            )
            print(f"  repeat {r} {name:5s} {dt:6.2f} s  {n_tok} tokens", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\nrollout of the demo config ({P} prompts x {G} samples, <= {cfg.rollout.max_new_tokens} new tokens, "
        f"{device}, {args.threads} threads (vLLM: {args.vllm_threads or args.threads}), torch {torch.__version__}):"
    )
    for name in ("hf", "vllm"):
        tps = statistics.median(t / s for t, s in zip(tokens[name], times[name]))
        extra = f"  (of which weight sync {statistics.median(syncs):.2f} s)" if name == "vllm" else ""
        print(f"  {name:5s} median {med[name]:6.2f} s  best {min(times[name]):6.2f} s  {tps:7.0f} tokens/s{extra}")
    print(f"  vLLM engine build {build:.1f} s (once per run); threads after build {threads_after_build}")
    print(f"  speed-up (median generate / median vLLM sync + generate): {med['hf'] / med['vllm']:.2f}x")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_rollout.jsonl"), "a") as f:
            for rec in records + [dict(bench="rollout", backend="vllm", build_seconds=build)]:
                rec.update(device=str(device), threads=args.threads, vllm_threads=args.vllm_threads)
                rec.update(torch=torch.__version__)
                f.write(json.dumps(rec) + "\n")
    vb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
