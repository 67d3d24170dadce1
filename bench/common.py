"""What every benchmark record carries: the machine, versions, git sha, date and command
(``environment()``), and where results go (``RESULTS_DIR``, ``bench/results/<machine>.jsonl``).
The op benchmarks (``bench/bench_<op>.py``) time through ``bench/conftest.py``; the whole-step
tools (``bench_trainer_step.py``, ``bench_rollout.py``, ``bench_zero3_step.py``) keep their own
command lines."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
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


def save_records(records: list[dict], *, results: str | None, out_dir: str | None, name: str) -> None:
    """Append ``records`` as JSON lines to ``bench/results/<results>`` (if given) and to
    ``<out_dir>/<name>.jsonl`` (if given); folders are made as needed."""
    paths = [RESULTS_DIR / results] if results else []
    if out_dir:
        paths.append(Path(out_dir) / f"{name}.jsonl")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
