"""Turn pytest-benchmark ``--benchmark-json`` output into ``bench/results/<card>.jsonl`` rows.

``python -m bench.results_jsonl BENCH.json [--out DIR] [--print]``: one JSON line per benchmark
with the case (pytest-benchmark group), the implementation, the kernel configuration, median and
20th/80th percentiles (quartiles when the raw data was not saved: ``--benchmark-save-data``
keeps it), GB/s and TFLOP/s from the case's bytes and FLOPs, and their fraction of the card's
ceilings measured in the same session (copy bandwidth, bf16 matmul), plus the machine, versions,
git sha, date and the command that reproduces it. Appends to ``DIR/<card>.jsonl`` (default
``bench/results``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import RESULTS_DIR


def _quantile(data: list[float], q: float) -> float:
    s = sorted(data)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def rows_from(report: dict) -> list[dict]:
    machine = report.get("machine_info", {})
    copy_bw = machine.get("copy_bytes_per_s")
    mm = machine.get("bf16_matmul_flop_per_s")
    common = {
        "machine": machine.get("card") or machine.get("node"),
        "torch": machine.get("torch"),
        "triton": machine.get("triton"),
        "git_sha": machine.get("git_sha") or report.get("commit_info", {}).get("id", "")[:7],
        "date": report.get("datetime"),
        "copy_TB_s": copy_bw / 1e12 if copy_bw else None,
        "matmul_TFLOP_s": mm / 1e12 if mm else None,
    }
    out = []
    for b in report.get("benchmarks", []):
        st, info = b["stats"], b.get("extra_info", {})
        data = st.get("data")
        median_ms = st["median"] * 1e3
        row = {
            **common,
            "case": info.get("case") or b.get("group"),
            "impl": info.get("impl") or b.get("param") or b["name"],
            "config": info.get("config") or machine.get("cepo_kernel_config"),
            "test": b["fullname"],
            "median_ms": median_ms,
            "p20_ms": (_quantile(data, 0.2) if data else st["q1"]) * 1e3,
            "p80_ms": (_quantile(data, 0.8) if data else st["q3"]) * 1e3,
            "rounds": st["rounds"],
            "command": f"pytest '{b['fullname']}' --benchmark-only",
        }
        nbytes, flops = info.get("bytes"), info.get("flops")
        if nbytes:
            row["GB_s"] = nbytes / (median_ms * 1e-3) / 1e9
            row["frac_of_copy_bw"] = row["GB_s"] * 1e9 / copy_bw if copy_bw else None
            row["floor_ms"] = nbytes / copy_bw * 1e3 if copy_bw else None
        if flops:
            row["TFLOP_s"] = flops / (median_ms * 1e-3) / 1e12
            row["frac_of_matmul"] = row["TFLOP_s"] * 1e12 / mm if mm else None
        row.update({k: v for k, v in info.items() if k not in ("case", "impl", "config", "bytes", "flops")})
        out.append(row)
    return out


# op -> the benchmark cases whose summed median decides its backend order
ORDER_CASES = {
    "token_logprobs": ("token_logprobs_fwd", "token_logprobs_bwd"),
    "contrastive_logprobs": ("contrastive_logprobs",),
    "contrastive_advantage": ("contrastive_advantage",),
}
OP_ORDERS = {op: ("triton", "cuda", "torch") for op in ORDER_CASES}


def measured_order(rows: list[dict]) -> dict:
    """``{card: {op: [backends fastest first]}}`` from the default configuration's rows (``auto``
    then follows the measurement; backends not measured keep their place after the measured ones)."""
    out: dict = {}
    for card in sorted({r["machine"] for r in rows}):
        for op, cases in ORDER_CASES.items():
            total: dict = {}
            for case in cases:
                for r in rows:
                    if r["machine"] == card and r["case"] == case and r.get("config") in (None, "v1"):
                        total.setdefault(r["impl"], {})[case] = r["median_ms"]
            timed = {b: sum(t.values()) for b, t in total.items() if b in OP_ORDERS[op] and len(t) == len(cases)}
            if len(timed) >= 2:
                ranked = sorted(timed, key=timed.get)
                out.setdefault(card, {})[op] = ranked + [b for b in OP_ORDERS[op] if b not in ranked]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder of <card>.jsonl (default bench/results)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--write-order", metavar="FILE", help="write the measured backend order per op and card "
                   "(JSON, for review: an op's ORDER in cepo_kernels/<op>.py changes by hand)")  # fmt: skip
    args = p.parse_args(argv)
    rows = []
    for f in args.json:
        try:
            rows += rows_from(json.loads(Path(f).read_text()))
        except (OSError, ValueError) as exc:  # a run that died leaves no (or half a) file
            print(f"{f}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
    if args.write_order:
        Path(args.write_order).write_text(json.dumps(measured_order(rows), indent=1) + "\n")
    if not args.no_write:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for r in rows:
            with open(Path(args.out) / f"{r['machine']}.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
    for r in sorted(rows, key=lambda r: (r["case"], r["median_ms"])):
        extra = ""
        if r.get("GB_s") is not None:
            extra += f"  {r['GB_s']:8.1f} GB/s" + (
                f" ({r['frac_of_copy_bw']:.2f} of copy)" if r.get("frac_of_copy_bw") else ""
            )
        if r.get("TFLOP_s") is not None:
            extra += f"  {r['TFLOP_s']:7.1f} TFLOP/s" + (
                f" ({r['frac_of_matmul']:.2f} of matmul)" if r.get("frac_of_matmul") else ""
            )
        print(
            f"{r['case'][:44]:44s} {str(r['impl'])[:20]:20s} {r['config'] or '-':3s} {r['median_ms']:10.3f} ms{extra}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
