"""``cepo compare``: the orchestration end to end on a tiny config, and the statistics on fixed inputs."""

from __future__ import annotations

import json
import math
import os

import pytest

from cepo import cli
from cepo import compare as cmp
from tests.trainer.conftest import make_config, write_jsonl


# ----------------------------------------------------------------------------- statistics
def test_t_quantiles_match_tables():
    # two-sided 95% critical values of Student's t (standard tables)
    for df, q in ((1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (10, 2.2281389), (30, 2.0422725)):
        assert cmp.t_quantile(0.975, df) == pytest.approx(q, abs=1e-6)
    assert cmp.t_cdf(0.0, 3) == pytest.approx(0.5)
    assert cmp.t_cdf(-2.7764451, 4) == pytest.approx(0.025, abs=1e-8)


def test_paired_t_interval_fixed_inputs():
    diffs = [0.02, 0.01, -0.005, 0.03, 0.015]
    out = cmp.paired_t_interval(diffs)
    mu = sum(diffs) / 5
    sd = math.sqrt(sum((d - mu) ** 2 for d in diffs) / 4)
    half = 2.7764451 * sd / math.sqrt(5)
    assert out["n"] == 5 and out["mean"] == pytest.approx(0.014) and out["sd"] == pytest.approx(sd)
    assert out["ci"] == pytest.approx([mu - half, mu + half], abs=1e-9)
    # t = mean / se = 2.4188316, df 4: two-sided p = 0.0728551 (scipy.stats.ttest_1samp)
    assert out["p_value"] == pytest.approx(0.0728551, abs=1e-6)
    one = cmp.paired_t_interval([0.1])
    assert one["mean"] == 0.1 and all(math.isnan(x) for x in one["ci"])
    zero = cmp.paired_t_interval([0.0, 0.0, 0.0])
    assert zero["ci"] == [0.0, 0.0] and zero["p_value"] == 1.0


def test_paired_comparison_and_bootstrap():
    grpo = {0: 0.20, 1: 0.25, 2: 0.22, 3: 0.30}
    cepo = {0: 0.24, 1: 0.24, 2: 0.26, 4: 0.99}  # seed 3 missing here, seed 4 missing in grpo
    c = cmp.paired_comparison(grpo, cepo, n_boot=2000)
    assert c["seeds"] == [0, 1, 2]
    assert c["differences"] == pytest.approx([0.04, -0.01, 0.04])
    assert (c["wins"], c["ties"], c["losses"]) == (2, 0, 1)
    assert c["mean"] == pytest.approx(0.07 / 3)
    lo, hi = c["bootstrap_ci"]
    assert -0.01 - 1e-12 <= lo <= c["mean"] <= hi <= 0.04 + 1e-12
    assert c["bootstrap_ci"] == cmp.paired_comparison(grpo, cepo, n_boot=2000)["bootstrap_ci"]  # seeded
    assert c["t_ci"][0] < lo and c["t_ci"][1] > hi  # with 3 seeds the t interval is the wider, honest one
    assert "paired Student-t" in c["method"]


def test_mean_std_and_curve_stats():
    assert cmp.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert cmp.mean_std([5.0]) == (5.0, 0.0)
    curves = [[(0, 0.1), (10, 0.2), (20, 0.3)], [(0, 0.1), (10, 0.4)]]
    st = cmp.curve_stats(curves)
    assert st["steps"] == [0, 10]
    assert st["mean"] == pytest.approx([0.1, 0.3]) and st["std"] == pytest.approx([0.0, math.sqrt(0.02)])
    assert st["min"] == [0.1, 0.2] and st["max"] == [0.1, 0.4]


def _fake_run(out, algo, seed, evals, step_time, wall=12.0, lam=0.0):
    d = cmp.run_dir(str(out), algo, seed)
    os.makedirs(os.path.join(d, "final"))
    rows = [{"step": 0, "eval/accuracy": evals[0]}]
    for k in (1, 2):
        rec = {"step": k, "reward": 0.5, "time/rollout": step_time / 2, "time/update": step_time / 2}
        rec["lam"] = lam if k == 1 else 0.0  # teacher passes at step 1 only
        if k == 1 and lam:
            rec["time/update"] += step_time  # twice the time while the teacher passes run
        if k == 2:
            rec["eval/accuracy"] = evals[1]
        rows.append(rec)
    write_jsonl(os.path.join(d, "metrics.jsonl"), rows)
    with open(os.path.join(d, cmp.MARKER), "w") as f:
        json.dump({"wall_s": wall}, f)


def test_summary_of_complete_pairs_only(tmp_path):
    _fake_run(tmp_path, "grpo", 0, [0.1, 0.20], 1.0)
    _fake_run(tmp_path, "grpo", 1, [0.1, 0.30], 1.0)
    _fake_run(tmp_path, "cepo", 0, [0.1, 0.25], 2.0, lam=0.5)
    os.makedirs(cmp.run_dir(str(tmp_path), "cepo", 1))  # started, never finished: no marker
    s = cmp.summarize(str(tmp_path), ["grpo", "cepo"], [0, 1])
    assert s["incomplete"] == ["cepo-seed1"]
    assert s["per_algorithm"]["grpo"]["final_mean"] == pytest.approx(0.25)
    assert s["per_algorithm"]["cepo"]["n"] == 1
    assert s["paired_vs_baseline"]["cepo"]["seeds"] == [0]
    assert s["paired_vs_baseline"]["cepo"]["differences"] == pytest.approx([0.05])
    assert s["step_time_ratio_vs_baseline"]["cepo"] == pytest.approx(3.0)  # (4 + 2) / 2 steps vs 1 + 1
    assert s["step_time_ratio_while_teacher_vs_baseline"]["cepo"] == pytest.approx(4.0)  # step 1: 4 s vs 1 s
    assert s["runs"]["grpo"]["1"]["mean_accuracy"] == pytest.approx(0.30)  # evaluations after step 0
    assert s["paired_vs_baseline_mean_accuracy"]["cepo"]["differences"] == pytest.approx([0.05])
    paths = cmp.write_summary(str(tmp_path), s)
    assert all(os.path.getsize(p) > 0 for p in paths)
    md = open(paths[1]).read()
    assert "cepo-seed1" in md and "+5.00" in md
    with pytest.raises(cmp.CompareError, match="no complete runs"):
        cmp.summarize(str(tmp_path / "empty"), ["grpo"], [0])


# ----------------------------------------------------------------------------- end to end
def test_compare_end_to_end(assets, tmp_path, capsys):
    config = make_config(
        assets, str(tmp_path / "cfg"), steps=2, eval_every=1, data__eval_file=assets["eval"], data__eval_limit=8
    )
    out = str(tmp_path / "cmp")
    argv = ["compare", config, "--algorithms", "grpo,cepo", "--seeds", "2", "--out", out, "--jobs", "2"]
    assert cli.main(argv) == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    for name in ("summary.json", "summary.md", "curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert open(os.path.join(out, "curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(os.path.join(out, "summary.md")).read()
    logged = {}
    for algo in ("grpo", "cepo"):
        for seed in (0, 1):
            rows = cmp.read_metrics(os.path.join(out, f"{algo}-seed{seed}", "metrics.jsonl"))
            evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
            assert [e[0] for e in evals] == [0, 1, 2]
            run = s["runs"][algo][str(seed)]
            assert [tuple(e) for e in run["evals"]] == evals  # the numbers the runs logged
            assert run["final_accuracy"] == evals[-1][1]
            step_time = sum(sum(v for k, v in r.items() if k.startswith("time/")) for r in rows[1:]) / 2
            assert run["step_time_s"] == pytest.approx(step_time)
            logged[algo, seed] = rows
        finals = [logged[algo, k][-1]["eval/accuracy"] for k in (0, 1)]
        assert s["per_algorithm"][algo]["final_accuracy"] == finals
        assert s["per_algorithm"][algo]["final_mean"] == pytest.approx(sum(finals) / 2)
        assert f"| {algo} | 2 |" in md
    diffs = [logged["cepo", k][-1]["eval/accuracy"] - logged["grpo", k][-1]["eval/accuracy"] for k in (0, 1)]
    assert s["paired_vs_baseline"]["cepo"]["differences"] == pytest.approx(diffs)
    # paired: one seed gives both algorithms the same prompts and sampling seeds, so the first
    # step (same initial policy) samples the same rollouts; another seed samples others
    for k in (0, 1):
        assert logged["grpo", k][1]["reward"] == logged["cepo", k][1]["reward"]
        assert logged["grpo", k][1]["response_length"] == logged["cepo", k][1]["response_length"]
    assert s["step_time_ratio_vs_baseline"]["cepo"] > 0
    assert s["eval_problems"] == 8 and "on 8 held-out problems" in md

    # resumable: a second call trains nothing and rewrites the same summary
    marker = os.path.join(out, "cepo-seed1", cmp.MARKER)
    mtime = os.path.getmtime(marker)
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "run(s) to do" not in capsys.readouterr().out
    assert os.path.getmtime(marker) == mtime
    assert json.load(open(os.path.join(out, "summary.json")))["runs"] == s["runs"]
    # an interrupted pair (no marker) is trained again
    os.remove(marker)
    assert cli.main(argv) == 0
    assert "1 run(s) to do, 3 already complete" in capsys.readouterr().out
    assert os.path.isfile(marker)
    # other overrides in the same DIR would mix unlike runs: refused
    assert cli.main([*argv[:2], "optim.lr=0.5", *argv[2:]]) == 2
    assert "holds runs of a different config or overrides" in capsys.readouterr().err


def test_compare_user_errors(assets, tmp_path, capsys):
    config = make_config(assets, str(tmp_path / "cfg"))
    for argv, needle in (
        (["compare", config, "--algorithms", "grpo,ppo", "--out", str(tmp_path)], "--algorithms"),
        (["compare", config, "seed=3", "--out", str(tmp_path)], "sets algorithm.name, seed and output_dir"),
        (["compare", config, "--seeds", "0", "--out", str(tmp_path)], "--seeds"),
        (["compare", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)], "config file not found"),
        (["compare", config, "no.such=1", "--out", str(tmp_path)], "unknown config key"),
        (["compare", config, "--summary-only", "--out", str(tmp_path / "o")], "no complete runs"),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cepo compare: error: ") and needle in err[0], (argv, err)


def test_demo_long_task_has_the_decisive_token_late(tmp_path):
    from cepo import demo
    from cepo.reward import extract_boxed

    paths = demo.make_data(str(tmp_path), seed=0, n_sft=30, n_rl=10, n_eval=10, n_ops=demo.TASKS["long"]["n_ops"])
    for line in open(paths["sft"]):
        row = json.loads(line)
        expr = row["question"][len("Compute ") : -1]
        assert expr.count("+") + expr.count("-") - expr.startswith("-") == 4
        assert str(eval(expr)) == row["answer"] == extract_boxed(row["solution"])
        good, bad = row["solution"], row["flawed_solution"]
        cut = good.index("\\boxed{")
        assert bad[:cut] == good[:cut]  # the working is identical: only the box differs
        assert extract_boxed(bad) == good.split("\n")[2].split("=")[1]  # the second-to-last result
