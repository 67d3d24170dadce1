"""Rollout time of the demo config: transformers' ``generate`` across environments, or vLLM vs
``generate`` in one.

Across environments (e.g. the main venv and the vLLM venv, whose transformers differ)::

    python -m bench.bench_rollout --envs .venv/bin/python .venv-vllm/bin/python \\
        --threads 1 2 --repeats 7 --clock cpu --out bench/results

starts one worker process per interpreter (``--serve``), each with the demo model and
``cepo.rollout.HFGenerateBackend``, and asks them in turn, alternating which goes first (the
machine's load drifts; this keeps it fair), to sample the same 32 prompts x 8 (same seed) for
each repeat and thread count. Each answer has the wall and process CPU time of one ``generate``
(the CPU time counts every thread: with 2 threads it is work, not latency). Prints the medians and
the median of the paired ratios; appends one JSON line per measurement (with the transformers
version, the load average, date, machine, git sha and command) to ``OUT/<machine>-rollout.jsonl``.

vLLM vs ``generate`` in this interpreter (``rollout.backend=vllm``; needs vLLM, e.g. the vLLM venv)::

    python -m bench.bench_rollout [--demo-dir runs/demo] [--repeats 5] [--out DIR]

for vLLM a weight sync (as the trainer does after every update) and ``generate``, for ``hf``
``generate``, alternating; ``--vllm-threads`` sets ``rollout.vllm_threads``. Appends to
``DIR/bench_rollout.jsonl``.

Both use the demo's warm-started 0.8M-parameter Qwen3 and ``configs/demo.yaml`` (32 prompts x 8
samples, temperature 1, at most 32 new tokens, ``generation_batch_size`` 256), built under
``--demo-dir`` if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default="runs/demo", help="demo assets (built if missing)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: all cores)")
    p.add_argument("--envs", nargs="+", default=None, help="python interpreters to compare `generate` in")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="the clock of the summary")
    p.add_argument("--vllm-threads", type=int, default=None, help="rollout.vllm_threads (default: --threads)")
    p.add_argument("--out", default=None, help="directory for the JSON lines")
    p.add_argument("--quick", action="store_true", help="(bench.run_all) 2 repeats")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args, _ = _parser().parse_known_args(argv)
    if args.quick:
        args.repeats = 2
    if args.repeats < 1:
        raise ValueError(f"--repeats: expected >= 1, got {args.repeats}")
    args.threads = args.threads or [os.cpu_count() or 1]
    if args.serve:
        return serve(args)
    if args.envs:
        return compare_envs(args)
    return compare_vllm(args)


# ------------------------------------------------------------------------------ the demo's inputs
def _ensure_assets(demo_dir: str, python: str = sys.executable) -> str:
    """``demo_dir/base_model`` (built with ``python -m cepo.demo --skip-train`` if missing)."""
    model_dir = os.path.join(demo_dir, "base_model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        print(f"building the demo assets under {demo_dir} ...", flush=True)
        subprocess.run([python, "-m", "cepo.demo", "--out", demo_dir, "--skip-train"], cwd=ROOT, check=True)
    return model_dir


def _demo_inputs(demo_dir: str):
    """(config, tokenizer, model, examples) of the demo, fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cepo.config import load_config
    from cepo.data import load_examples

    model_dir = os.path.join(demo_dir, "base_model")
    cfg = load_config(
        os.path.join(ROOT, "configs", "demo.yaml"),
        [f"model.path={model_dir}", f"data.train_file={os.path.join(demo_dir, 'train.jsonl')}"],
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    examples, _ = load_examples(cfg.data.train_file, tok, cfg.data)
    return cfg, tok, model, examples


def _tokens(out) -> list[list[int]]:
    return getattr(out, "tokens", out)  # `Samples` or a plain list of rows


# ------------------------------------------------------------------------ generate across envs
def serve(args) -> int:
    """Worker: JSON requests on stdin (``{"threads", "batch", "seed"}``), one JSON answer each on
    stdout (``{"wall_s", "cpu_s", "tokens"}``); library output goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import torch
    import transformers

    from cepo.data import PromptStream
    from cepo.rollout import HFGenerateBackend

    cfg, tok, model, examples = _demo_inputs(args.demo_dir)
    stream = PromptStream(len(examples), cfg.seed)
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    batches = [[examples[i].prompt_ids for i in stream.next(P)] for _ in range(args.repeats + 1)]
    backend = HFGenerateBackend(model, tok, cfg.rollout, device=torch.device("cpu"))
    info = dict(python=sys.executable, transformers=transformers.__version__, torch=torch.__version__, P=P, G=G)
    info["max_new_tokens"] = cfg.rollout.max_new_tokens
    proto.write(json.dumps(info) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        torch.set_num_threads(int(req["threads"]))
        prompts = batches[int(req["batch"])]
        t, c = time.perf_counter(), time.process_time()
        out = backend.generate(prompts, G, int(req["seed"]))
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        proto.write(json.dumps(dict(wall_s=wall, cpu_s=cpu, tokens=sum(map(len, _tokens(out))))) + "\n")
    return 0


class _Worker:
    def __init__(self, python: str, args):
        cmd = [python, "-m", "bench.bench_rollout", "--serve", "--demo-dir", args.demo_dir]
        cmd += ["--repeats", str(args.repeats)]
        env = {**os.environ, "PYTHONPATH": ROOT}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench_rollout: the worker in {python} exited ({self.proc.wait()}); see its stderr")
        self.info = json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench_rollout: the worker in {self.info['python']} exited; see its stderr")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def compare_envs(args) -> int:
    from bench.common import environment

    _ensure_assets(args.demo_dir, args.envs[0])
    workers = [_Worker(py, args) for py in args.envs]
    names = [f"transformers {w.info['transformers']} ({os.path.relpath(w.info['python'], ROOT)})" for w in workers]
    for w in workers:  # warm-up: first calls allocate
        for t in args.threads:
            w.ask(threads=t, batch=0, seed=0)
    env = environment()
    records = []
    for r in range(args.repeats):
        for ti, t in enumerate(args.threads):
            order = list(range(len(workers)))
            if (r + ti) % 2:
                order.reverse()
            for k in order:
                res = workers[k].ask(threads=t, batch=r + 1, seed=1000 + r)
                rec = dict(bench="rollout_generate", env=k, **workers[k].info, threads=t, repeat=r, **res)
                rec.update(load_avg_1m=os.getloadavg()[0], **{key: env[key] for key in ("machine", "git_sha")})
                rec.update(date=environment()["date"], command=env["command"])
                records.append(rec)
                print(
                    f"  repeat {r} threads {t} {names[k]}: wall {res['wall_s']:.3f} s  cpu {res['cpu_s']:.3f} s  "
                    f"{res['tokens']} tokens  load {rec['load_avg_1m']:.1f}",
                    flush=True,
                )
    for w in workers:
        w.close()
    key = f"{args.clock}_s"
    info = workers[0].info
    print(
        f"\n`generate` of the demo config ({info['P']} prompts x {info['G']} samples, <= {info['max_new_tokens']} "
        f"new tokens, CPU, torch {info['torch']}), {args.repeats} repeats, clock {args.clock}; medians:"
    )
    for t in args.threads:
        rows = {k: [x for x in records if x["env"] == k and x["threads"] == t] for k in range(len(workers))}
        for k, name in enumerate(names):
            vals = [x[key] for x in rows[k]]
            tps = statistics.median(x["tokens"] / x[key] for x in rows[k])
            line = f"  threads {t}  {name:45s} {statistics.median(vals):.3f} s (best {min(vals):.3f})  {tps:6.0f} tok/s"
            if k:
                ratio = statistics.median(b[key] / a[key] for a, b in zip(rows[0], rows[k]))
                line += f"  paired ratio to the first {ratio:.3f}"
            print(line)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{env['machine']}-rollout.jsonl"), "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return 0


# --------------------------------------------------------------------------- vLLM vs generate
def compare_vllm(args) -> int:
    import torch

    from cepo.rollout_vllm import vllm_available

    why = vllm_available()
    if why is not None:
        print(f"bench_rollout: vLLM not importable ({why}); `make vllm-venv` and run this with .venv-vllm/bin/python")
        return 0
    threads = args.threads[0]
    torch.set_num_threads(threads)
    from cepo.data import PromptStream
    from cepo.engine import setup_distributed
    from cepo.rollout import HFGenerateBackend
    from cepo.rollout_vllm import VLLMBackend

    model_dir = _ensure_assets(args.demo_dir)
    cfg, tok, model, examples = _demo_inputs(args.demo_dir)
    _, _, device = setup_distributed()
    model = model.to(device)
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
        return _tokens(out), time.perf_counter() - t, t_sync

    def run_hf(prompts, seed):
        t = time.perf_counter()
        out = hb.generate(prompts, G, seed)
        return _tokens(out), time.perf_counter() - t, 0.0

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
        f"{device}, {threads} threads (vLLM: {args.vllm_threads or threads}), torch {torch.__version__}):"
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
                rec.update(device=str(device), threads=threads, vllm_threads=args.vllm_threads)
                rec.update(torch=torch.__version__)
                f.write(json.dumps(rec) + "\n")
    vb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
