"""``cepo compare``: the same task, model and budget trained with several algorithms over several
seeds, and an honest summary of the differences.

Each ``(algorithm, seed)`` pair is one ``cepo train`` subprocess writing to
``OUT/<algorithm>-seed<seed>/``; the seed drives the data order and the rollout sampling seeds, so
the runs of one seed see the same prompts in the same order and are compared *paired*. Runs are
ordered seed by seed (all algorithms of seed 0, then seed 1, ...) so that a comparison stopped
early still holds complete pairs. A pair is complete when its ``compare_run.json`` marker exists
(written after the subprocess exits with status 0 and ``final/`` and ``metrics.jsonl`` reached the
last step); complete pairs are skipped when the command is run again, incomplete ones are started
afresh.

The summary (``summary.json``, ``summary.md``, ``curves.png``) is built from whatever pairs are
complete. Statistics (pure functions below, tested on fixed inputs):

- per algorithm: final held-out accuracy mean and sample std over seeds, and the accuracy curve
  (mean, std, min, max per evaluation step);
- per algorithm against the baseline (GRPO): the per-seed paired difference of final accuracy, its
  mean, a two-sided **paired t** confidence interval (the primary interval: with a handful of seeds
  the percentile bootstrap is too narrow) and a **paired percentile bootstrap** interval over seeds
  for reference, and wins / ties / losses;
- time: mean wall time per RL step (the sum of the trainer's ``time/*`` phases; evaluation is not
  included) and of the whole run, and the ratio of each algorithm's step time to the baseline's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

MARKER = "compare_run.json"


class CompareError(ValueError):
    """A user error in ``cepo compare`` (bad arguments, no complete runs, a failed run)."""


# ----------------------------------------------------------------------------- statistics
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mu = sum(values) / n
    if n == 1:
        return mu, 0.0
    return mu, math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of :func:`t_cdf` (bisection), ``0 < p < 1``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p: expected in (0, 1), got {p!r}")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def paired_t_interval(diffs: list[float], confidence: float = 0.95) -> dict:
    """Mean of paired differences with a two-sided Student-t interval and p-value (H0: mean 0)."""
    n = len(diffs)
    mu, sd = mean_std(diffs)
    out = {"n": n, "mean": mu, "sd": sd, "ci": [float("nan"), float("nan")], "p_value": float("nan")}
    if n < 2:
        return out
    se = sd / math.sqrt(n)
    q = t_quantile(0.5 + confidence / 2.0, n - 1)
    out["ci"] = [mu - q * se, mu + q * se]
    if se > 0:
        out["p_value"] = 2.0 * (1.0 - t_cdf(abs(mu) / se, n - 1))
    else:
        out["p_value"] = 1.0 if mu == 0 else 0.0
    return out


def paired_bootstrap_interval(
    diffs: list[float], confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> list[float]:
    """Percentile bootstrap interval of the mean paired difference, resampling seeds with replacement."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))]


def paired_comparison(
    baseline: dict[int, float], other: dict[int, float], confidence: float = 0.95, n_boot: int = 10_000
) -> dict:
    """``other - baseline`` per seed present in both, with the t and bootstrap intervals."""
    seeds = sorted(set(baseline) & set(other))
    diffs = [other[s] - baseline[s] for s in seeds]
    t = paired_t_interval(diffs, confidence)
    return {
        "seeds": seeds,
        "differences": diffs,
        "n": len(diffs),
        "mean": t["mean"],
        "sd": t["sd"],
        "confidence": confidence,
        "t_ci": t["ci"],
        "t_p_value": t["p_value"],
        "bootstrap_ci": paired_bootstrap_interval(diffs, confidence, n_boot),
        "wins": sum(d > 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
        "method": "paired Student-t over seeds (primary); paired percentile bootstrap over seeds (reference)",
    }


def curve_stats(curves: list[list[tuple[int, float]]]) -> dict:
    """Per evaluation step present in every curve: mean, std, min and max over the curves."""
    if not curves:
        return {"steps": [], "mean": [], "std": [], "min": [], "max": []}
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    out = {"steps": common, "mean": [], "std": [], "min": [], "max": []}
    for step in common:
        vals = [dict(c)[step] for c in curves]
        mu, sd = mean_std(vals)
        out["mean"].append(mu)
        out["std"].append(sd)
        out["min"].append(min(vals))
        out["max"].append(max(vals))
    return out


# ----------------------------------------------------------------------------- one run
def run_dir(out: str, algorithm: str, seed: int) -> str:
    return os.path.join(out, f"{algorithm}-seed{seed}")


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# phases timed inside another phase (not added twice): child -> parent
NESTED_PHASES = {"time/logprob_ref": "time/experience"}


def step_time(record: dict) -> float:
    """Wall time of one RL step: the sum of its ``time/*`` phases (nested ones counted once)."""
    return sum(
        v
        for k, v in record.items()
        if k.startswith("time/") and isinstance(v, (int, float)) and NESTED_PHASES.get(k) not in record
    )


def run_record(directory: str) -> dict:
    """What a complete run logged: held-out accuracy per evaluation step, final accuracy, timings."""
    with open(os.path.join(directory, MARKER)) as f:
        marker = json.load(f)
    records = read_metrics(os.path.join(directory, "metrics.jsonl"))
    evals = [(int(r["step"]), float(r["eval/accuracy"])) for r in records if "eval/accuracy" in r]
    steps = [r for r in records if r.get("step", 0) >= 1]
    step_times = [step_time(r) for r in steps]
    phases = sorted({k for r in steps for k in r if k.startswith("time/")})
    return {
        "dir": directory,
        "steps": len(steps),
        "evals": evals,
        "final_accuracy": evals[-1][1] if evals else float("nan"),
        # a less noisy secondary measure: the mean of the evaluations after step 0 (area under the curve)
        "mean_accuracy": sum(a for s, a in evals if s > 0) / max(1, sum(1 for s, _ in evals if s > 0)),
        "step_time_s": sum(step_times) / len(step_times) if step_times else float("nan"),
        "step_times_s": step_times,
        "teacher_steps": [int(r["step"]) for r in steps if r.get("lam", 0) > 0],  # steps where lam > 0
        "phase_time_s": {p: sum(r.get(p, 0.0) for r in steps) / len(steps) for p in phases} if steps else {},
        "wall_s": marker.get("wall_s", float("nan")),
        "final_reward": steps[-1].get("reward", float("nan")) if steps else float("nan"),
    }


def teacher_step_ratio(baseline: dict[int, dict], other: dict[int, dict]) -> float:
    """Step-time ratio over the steps where ``other`` ran teacher passes (``lam > 0``), same seeds and
    steps of the baseline; the mean of the per-seed ratios (nan when there are none)."""
    ratios = []
    for seed in sorted(set(baseline) & set(other)):
        steps = other[seed].get("teacher_steps", [])
        a, b = other[seed].get("step_times_s", []), baseline[seed].get("step_times_s", [])
        steps = [k for k in steps if k <= min(len(a), len(b))]
        if steps:
            ta, tb = sum(a[k - 1] for k in steps), sum(b[k - 1] for k in steps)
            if tb > 0:
                ratios.append(ta / tb)
    return sum(ratios) / len(ratios) if ratios else float("nan")


def is_complete(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MARKER))


def train_command(config: str, overrides: list[str], algorithm: str, seed: int, directory: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cepo.cli",
        "train",
        config,
        *overrides,
        f"algorithm.name={algorithm}",
        f"seed={seed}",
        f"output_dir={directory}",
        "progress_bar=false",
    ]


# torch.distributed variables of this process (e.g. a pytest process that ran a Trainer): each run
# is its own world of one and picks its own port
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _child_env(threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the code this process runs
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def execute_run(
    config: str, overrides: list[str], algorithm: str, seed: int, out: str, *, threads: int | None = None, log=print
) -> dict:
    """Train one pair in a subprocess (log in ``train.log``); write the marker when it completed."""
    directory = run_dir(out, algorithm, seed)
    if is_complete(directory):  # finished meanwhile (e.g. by another cepo compare on the same DIR)
        with open(os.path.join(directory, MARKER)) as f:
            return json.load(f)
    if os.path.isdir(directory):  # an interrupted attempt: start afresh
        shutil.rmtree(directory)
    os.makedirs(directory)
    cmd = train_command(config, overrides, algorithm, seed, directory)
    log(f"  {algorithm} seed {seed}: training ({directory}/train.log)")
    t0 = time.time()
    with open(os.path.join(directory, "train.log"), "w") as logf:
        rc = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT, env=_child_env(threads))
    wall = time.time() - t0
    if rc != 0:
        tail = open(os.path.join(directory, "train.log")).read().strip().splitlines()[-1:] or [""]
        raise CompareError(
            f"{algorithm} seed {seed} failed (exit status {rc}); see {directory}/train.log: {tail[0][:300]}"
        )
    records = read_metrics(os.path.join(directory, "metrics.jsonl"))
    last = max((r.get("step", 0) for r in records), default=0)
    if not os.path.isdir(os.path.join(directory, "final")):
        raise CompareError(f"{algorithm} seed {seed}: no final model in {directory}")
    marker = {"algorithm": algorithm, "seed": seed, "wall_s": wall, "last_step": last, "command": cmd}
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump(marker, f, indent=1)
    log(f"  {algorithm} seed {seed}: done in {wall:.0f}s")
    return marker


# ----------------------------------------------------------------------------- the comparison
def parse_algorithms(text: str) -> list[str]:
    algos = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in algos if a not in ("grpo", "rlsd", "cepo")]
    if bad or not algos:
        raise CompareError(f"--algorithms: expected a comma-separated subset of grpo,rlsd,cepo, got {text!r}")
    if len(set(algos)) != len(algos):
        raise CompareError(f"--algorithms: {text!r} names an algorithm twice")
    return algos


def run_compare(
    config: str,
    overrides: list[str],
    algorithms: list[str],
    seeds: list[int],
    out: str,
    *,
    jobs: int = 1,
    summary_only: bool = False,
    baseline: str = "grpo",
    log=print,
) -> dict:
    """Run every missing ``(algorithm, seed)`` pair, then write the summary of the complete ones."""
    if not os.path.isfile(config):
        raise CompareError(f"config file not found: {config}")
    reserved = ("algorithm.name=", "seed=", "output_dir=")
    for o in overrides:
        if o.startswith(reserved):
            raise CompareError(f"override {o!r}: cepo compare sets algorithm.name, seed and output_dir itself")
    if jobs < 1:
        raise CompareError(f"--jobs: expected >= 1, got {jobs}")
    from cepo.config import load_config

    load_config(config, list(overrides))  # a bad key or value fails here, once, not in every run
    os.makedirs(out, exist_ok=True)
    setup = {"config": config, "config_text": open(config).read(), "overrides": list(overrides)}
    previous = os.path.join(out, "compare.json")
    if os.path.isfile(previous):  # runs of another config in the same DIR would be compared as if alike
        with open(previous) as f:
            before = json.load(f)
        if any(k in before and before[k] != setup[k] for k in ("config_text", "overrides")):
            raise CompareError(
                f"{out} holds runs of a different config or overrides ({before.get('config')} "
                f"{' '.join(before.get('overrides', []))}); use another --out"
            )
    with open(previous, "w") as f:
        json.dump(setup, f, indent=1)
    todo = [(a, s) for s in seeds for a in algorithms if not is_complete(run_dir(out, a, s))]
    done = len(seeds) * len(algorithms) - len(todo)
    if not summary_only and todo:
        log(f"cepo compare: {len(todo)} run(s) to do, {done} already complete, under {out}")
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
        if jobs == 1:
            for a, s in todo:
                execute_run(config, overrides, a, s, out, log=log)
        else:
            with ThreadPoolExecutor(jobs) as pool:
                futures = [
                    pool.submit(execute_run, config, overrides, a, s, out, threads=threads, log=log) for a, s in todo
                ]
                errors = []
                for fut in futures:
                    try:
                        fut.result()
                    except CompareError as exc:
                        errors.append(str(exc))
                if errors:
                    raise CompareError("; ".join(errors))
    summary = summarize(out, algorithms, seeds, baseline=baseline, config=config, overrides=overrides)
    write_summary(out, summary)
    return summary


def summarize(
    out: str,
    algorithms: list[str],
    seeds: list[int],
    *,
    baseline: str = "grpo",
    config: str | None = None,
    overrides: list[str] = (),
    confidence: float = 0.95,
) -> dict:
    """The statistics of every complete run under ``out`` (see the module docstring)."""
    runs: dict[str, dict[int, dict]] = {a: {} for a in algorithms}
    incomplete = []
    for a in algorithms:
        for s in seeds:
            d = run_dir(out, a, s)
            if is_complete(d):
                runs[a][s] = run_record(d)
            else:
                incomplete.append(f"{a}-seed{s}")
    if not any(runs.values()):
        raise CompareError(f"no complete runs under {out} (run cepo compare without --summary-only first)")
    per_alg = {}
    for a in algorithms:
        recs = runs[a]
        finals = [recs[s]["final_accuracy"] for s in sorted(recs)]
        mu, sd = mean_std(finals)
        st_mu, _ = mean_std([recs[s]["step_time_s"] for s in recs])
        wall_mu, _ = mean_std([recs[s]["wall_s"] for s in recs])
        per_alg[a] = {
            "n": len(recs),
            "seeds": sorted(recs),
            "final_accuracy": finals,
            "final_mean": mu,
            "final_std": sd,
            "curve": curve_stats([recs[s]["evals"] for s in sorted(recs)]),
            "step_time_mean_s": st_mu,
            "wall_mean_s": wall_mu,
        }
    paired, paired_mean, ratios, active = {}, {}, {}, {}
    if baseline in runs:
        base = {s: r["final_accuracy"] for s, r in runs[baseline].items()}
        base_mean = {s: r["mean_accuracy"] for s, r in runs[baseline].items()}
        for a in algorithms:
            if a == baseline:
                continue
            paired[a] = paired_comparison(base, {s: r["final_accuracy"] for s, r in runs[a].items()}, confidence)
            other_mean = {s: r["mean_accuracy"] for s, r in runs[a].items()}
            paired_mean[a] = paired_comparison(base_mean, other_mean, confidence)
            b = per_alg[baseline]["step_time_mean_s"]
            ratios[a] = per_alg[a]["step_time_mean_s"] / b if b and b == b and per_alg[a]["n"] else float("nan")
            active[a] = teacher_step_ratio(runs[baseline], runs[a])
    eval_sizes = _eval_problems(config, overrides)
    return {
        "config": config,
        "overrides": list(overrides),
        "algorithms": algorithms,
        "seeds_requested": list(seeds),
        "baseline": baseline,
        "incomplete": incomplete,
        "eval_problems": eval_sizes,
        "runs": {a: {str(s): r for s, r in runs[a].items()} for a in algorithms},
        "per_algorithm": per_alg,
        "paired_vs_baseline": paired,
        "paired_vs_baseline_mean_accuracy": paired_mean,
        "step_time_ratio_vs_baseline": ratios,
        "step_time_ratio_while_teacher_vs_baseline": active,
        "notes": (
            "final accuracy = held-out greedy accuracy at the last step; std = sample std over seeds; "
            "band in curves.png = mean +- 1 std over seeds; step time = mean over steps of the sum of the "
            "trainer's time/* phases (evaluation excluded); intervals are two-sided at the given confidence."
        ),
    }


def _eval_problems(config: str | None, overrides) -> int | None:
    """How many held-out problems each evaluation used (``data.eval_limit`` or the file's rows)."""
    if not config:
        return None
    from cepo.config import load_config
    from cepo.data import load_rows

    cfg = load_config(config, list(overrides))
    if not cfg.data.eval_file or not os.path.isfile(cfg.data.eval_file):
        return cfg.data.eval_limit
    rows = len(load_rows(cfg.data.eval_file, cfg.data.question_field, cfg.data.answer_field))
    return min(rows, cfg.data.eval_limit) if cfg.data.eval_limit else rows


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.2f}"


def summary_markdown(summary: dict) -> str:
    base = summary["baseline"]
    lines = ["# cepo compare", ""]
    if summary.get("config"):
        lines += [f"Config `{summary['config']}` " + " ".join(f"`{o}`" for o in summary["overrides"]), ""]
    lines += [
        "## Final held-out accuracy (%)",
        "",
        "| algorithm | seeds | mean | std | per seed | step time (s) | run wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for a, p in summary["per_algorithm"].items():
        per_seed = ", ".join(f"{s}: {_pct(v)}" for s, v in zip(p["seeds"], p["final_accuracy"]))
        lines.append(
            f"| {a} | {p['n']} | {_pct(p['final_mean'])} | {_pct(p['final_std'])} | {per_seed} | "
            f"{p['step_time_mean_s']:.2f} | {p['wall_mean_s']:.0f} |"
        )
    if summary["paired_vs_baseline"]:
        conf = next(iter(summary["paired_vs_baseline"].values()))["confidence"]
        lines += [
            "",
            f"## Paired difference against {base} (percentage points, {100 * conf:.0f}% intervals)",
            "",
            "| algorithm | pairs | mean diff | paired t CI | p (t) | bootstrap CI | wins/ties/losses "
            f"| per seed | step-time ratio vs {base} (all steps / steps with lam > 0) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for a, c in summary["paired_vs_baseline"].items():
            per_seed = ", ".join(f"{s}: {100 * d:+.1f}" for s, d in zip(c["seeds"], c["differences"]))
            t_ci = "n/a" if c["t_ci"][0] != c["t_ci"][0] else f"[{100 * c['t_ci'][0]:+.2f}, {100 * c['t_ci'][1]:+.2f}]"
            bs = c["bootstrap_ci"]
            bs_ci = "n/a" if bs[0] != bs[0] else f"[{100 * bs[0]:+.2f}, {100 * bs[1]:+.2f}]"
            p = c["t_p_value"]
            lines.append(
                f"| {a} | {c['n']} | {100 * c['mean']:+.2f} | {t_ci} | {'n/a' if p != p else f'{p:.3f}'} | {bs_ci} | "
                f"{c['wins']}/{c['ties']}/{c['losses']} | {per_seed} | "
                f"{summary['step_time_ratio_vs_baseline'][a]:.2f} / "
                f"{summary.get('step_time_ratio_while_teacher_vs_baseline', {}).get(a, float('nan')):.2f} |"
            )
        lines += ["", "Secondary measure, the mean held-out accuracy over the evaluations after step 0:", ""]
        for a, c in summary.get("paired_vs_baseline_mean_accuracy", {}).items():
            ci = "n/a" if c["t_ci"][0] != c["t_ci"][0] else f"[{100 * c['t_ci'][0]:+.2f}, {100 * c['t_ci'][1]:+.2f}]"
            lines.append(
                f"- {a} - {base}: {100 * c['mean']:+.2f} points, paired t CI {ci}, "
                f"wins/ties/losses {c['wins']}/{c['ties']}/{c['losses']}"
            )
        lines += [
            "",
            "Method: " + next(iter(summary["paired_vs_baseline"].values()))["method"] + ". A pair is the same seed "
            "(same data order and rollout sampling seeds) trained with both algorithms. An interval that contains 0 "
            "means the difference is not distinguishable from seed noise at this number of seeds.",
        ]
    lines += ["", "## Held-out accuracy curves (% mean +- std over seeds)", ""]
    for a, p in summary["per_algorithm"].items():
        c = p["curve"]
        pts = ", ".join(f"{s}: {_pct(m)} +- {_pct(sd)}" for s, m, sd in zip(c["steps"], c["mean"], c["std"]))
        lines.append(f"- **{a}**: {pts}")
    n_eval = summary.get("eval_problems")
    finals = [m for p in summary["per_algorithm"].values() for m in p["final_accuracy"]]
    if n_eval and finals:
        acc = sum(finals) / len(finals)
        se = math.sqrt(acc * (1 - acc) / n_eval)
        lines += [
            "",
            f"For scale: on {n_eval} held-out problems one run's accuracy near {100 * acc:.1f}% has a binomial "
            f"standard error of about {100 * se:.1f} points from the choice of problems alone.",
        ]
    if summary["incomplete"]:
        lines += ["", f"Incomplete (not in the statistics): {', '.join(summary['incomplete'])}"]
    lines += ["", summary["notes"], ""]
    return "\n".join(lines)


def plot_curves(summary: dict, path: str) -> None:
    """Held-out accuracy against step: mean line, +-1 std band and thin per-seed lines per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"grpo": "#4c72b0", "rlsd": "#dd8452", "cepo": "#55a868"}
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=150)
    for a, p in summary["per_algorithm"].items():
        color = colors.get(a)
        for rec in summary["runs"][a].values():
            xs, ys = zip(*rec["evals"]) if rec["evals"] else ((), ())
            ax.plot(xs, [100 * y for y in ys], color=color, alpha=0.2, linewidth=0.8)
        c = p["curve"]
        if not c["steps"]:
            continue
        mean = [100 * m for m in c["mean"]]
        lo = [100 * (m - s) for m, s in zip(c["mean"], c["std"])]
        hi = [100 * (m + s) for m, s in zip(c["mean"], c["std"])]
        ax.fill_between(c["steps"], lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.plot(
            c["steps"],
            mean,
            color=color,
            linewidth=2,
            marker="o",
            markersize=3,
            label=f"{a} (n={p['n']}): {_pct(p['final_mean'])} \u00b1 {_pct(p['final_std'])} %",
        )
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("held-out accuracy: mean +- 1 std over seeds (thin: each seed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_summary(out: str, summary: dict) -> list[str]:
    paths = [os.path.join(out, n) for n in ("summary.json", "summary.md", "curves.png")]
    with open(paths[0], "w") as f:
        json.dump(summary, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(summary_markdown(summary))
    plot_curves(summary, paths[2])
    return paths
