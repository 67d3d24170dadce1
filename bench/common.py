"""Shared benchmark helpers: timing, copy bandwidth, peak memory, and result records.

Every benchmark checks correctness before it times, reports the median and the 20th/80th
percentiles, and appends one JSON line per case to ``bench/results/<gpu>.jsonl`` (and to
``--out DIR`` when given). Timing thresholds never appear in tests.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_name() -> str:
    """The GPU's name with spaces as underscores, or ``cpu-<processor>``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return "cpu-" + (platform.processor() or platform.machine()).replace(" ", "_")


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS_DIR.parent, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment() -> dict:
    """Versions and machine, stored with every record."""
    env = {
        "machine": machine_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], *, warmup: int = 3, reps: int = 20) -> dict:
    """Time ``fn``: on CUDA with ``triton.testing.do_bench`` (L2 flushed between runs), on CPU
    with wall clock. Returns ``{"median_ms", "p20_ms", "p80_ms"}``."""
    if torch.cuda.is_available():
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()

    def pick(q):
        return times[min(len(times) - 1, int(q * (len(times) - 1) + 0.5))]

    return {"median_ms": pick(0.5), "p20_ms": pick(0.2), "p80_ms": pick(0.8)}


def peak_extra_memory(fn: Callable[[], object]) -> float | None:
    """Peak bytes allocated by one call of ``fn`` beyond what was allocated before (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return float(peak)


def copy_bandwidth(nbytes: int = 1 << 30) -> float | None:
    """Measured device copy bandwidth in bytes/s (read + write counted), CUDA only."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src))["median_ms"]
    return 2 * src.numel() / (t * 1e-3)


def record(case: dict, out_dir: str | Path | None = None) -> dict:
    """Append ``case`` (plus the environment) as one JSON line to ``bench/results/<machine>.jsonl``
    (GPU runs only: CPU smoke runs are not results) and to ``out_dir/<machine>.jsonl`` when
    given. Returns the full record."""
    full = {**environment(), **case}
    dirs = ([RESULTS_DIR] if torch.cuda.is_available() else []) + ([Path(out_dir)] if out_dir else [])
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{full['machine']}.jsonl", "a") as f:
            f.write(json.dumps(full) + "\n")
    return full


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Correctness gate run before timing: raise if ``got`` is off ``want``."""
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite):
        raise AssertionError(f"{name}: non-finite entries differ from the reference")
    err = (got[finite] - want[finite]).abs()
    bound = atol + rtol * want[finite].abs()
    if err.numel() and bool((err > bound).any()):
        raise AssertionError(f"{name}: max abs error {err.max().item():.3g} exceeds atol={atol} rtol={rtol}")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    p.add_argument("--out", default=None, help="also write the JSON lines under this folder")
    return p


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)
