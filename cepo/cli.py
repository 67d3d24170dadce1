"""``cepo`` command line: argument parsing and error reporting only; the work is in train /
evaluate / export / compare / viz.

A user error (a bad config key or value, a missing file or directory, a bad data row, an unknown
reward function, a bad argument) prints one line ``cepo <command>: error: <message>`` on stderr
and exits with status 2; ``--debug`` shows the traceback instead. Anything else is a bug and keeps
its traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import sys

# Exceptions whose message is meant for the person at the keyboard (the config, data, reward and
# model-path layers raise these naming the key, file, row or path).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ImportError)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``cepo train: error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    common.add_argument(
        "--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS
    )
    parser = _Parser(prog="cepo", description="CEPO / RLSD / GRPO fine-tuning on DeepSpeed")
    # its own dest: a subcommand's default would overwrite `cepo --debug train ...`
    parser.add_argument("--debug", dest="debug_top", action="store_true", help="show the full traceback of an error")
    # the `deepspeed` launcher starts `python -m cepo.cli --local_rank=N train ...` (it also sets LOCAL_RANK)
    parser.add_argument(
        "--local_rank", "--local-rank", dest="local_rank_top", type=int, default=None, help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "train",
        help="train from a YAML config",
        parents=[common],
        description="cepo train CONFIG.yaml [key=value ...] [--resume]. Keys: the configuration reference in "
        "README.md ('The trainer') and the dataclasses in cepo/config.py.",
    )
    p.add_argument("config", help="YAML config file (keys: README.md, 'Configuration reference')")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. rollout.group_size=8")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")

    p = sub.add_parser("eval", help="greedy accuracy of a model directory on a data file", parents=[common])
    p.add_argument("model", help="Hugging Face model directory")
    p.add_argument("data", help=".jsonl / .parquet / .csv with question and answer fields")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. data.question_field=problem")

    p = sub.add_parser("export", help="write a Hugging Face model directory from a run or checkpoint", parents=[common])
    p.add_argument("src", help="run directory, checkpoint directory or hf/ directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the base weights")

    p = sub.add_parser(
        "compare",
        help="train several algorithms over several seeds and compare them (paired statistics)",
        parents=[common],
        description="cepo compare CONFIG [key=value ...] --algorithms grpo,rlsd,cepo --seeds N --out DIR. "
        "Runs every (algorithm, seed) pair with the same config (seed by seed), skips pairs already complete, "
        "and writes DIR/summary.json, DIR/summary.md and DIR/curves.png.",
    )
    p.add_argument("config", help="YAML config file shared by all runs")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides applied to every run")
    p.add_argument("--algorithms", default="grpo,rlsd,cepo", help="comma-separated (default grpo,rlsd,cepo)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds: 0 .. N-1 (default 3)")
    p.add_argument("--seed-offset", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--out", required=True, help="directory for the runs and the summary")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1: sequential)")
    p.add_argument("--baseline", default="grpo", help="algorithm the paired differences are taken against")
    p.add_argument("--summary-only", action="store_true", help="only summarise the complete runs")

    p = sub.add_parser(
        "viz",
        help="token-credit map of logged samples (HTML, optional PNG)",
        parents=[common],
        description="cepo viz RUN_DIR [--step K] --out credit.html [--png credit.png]: each sampled group's "
        "correct and wrong responses with every token shaded by A_t / A (or delta_t). Needs a run trained "
        "with log_samples_every > 0.",
    )
    p.add_argument("run_dir", help="a run's output_dir (holding samples/step-XXXXXX.jsonl)")
    p.add_argument("--step", type=int, default=None, help="which logged step (default: the last)")
    p.add_argument("--out", default="credit.html", help="HTML file to write (default credit.html)")
    p.add_argument("--png", default=None, help="also write the map as an image (matplotlib)")
    p.add_argument("--groups", type=int, default=None, help="show at most this many groups")
    p.add_argument("--color", choices=("ratio", "delta"), default="ratio", help="initial shading: A_t/A or delta_t")
    return parser


def _run(args) -> int:
    if args.command == "train":
        from cepo.config import load_config
        from cepo.paths import check_train_paths

        check_train_paths(load_config(args.config, args.overrides))
        from cepo.train import run_from_config

        summary = run_from_config(args.config, args.overrides, resume=args.resume)
        if os.environ.get("RANK", "0") == "0":  # one summary line per run, not per rank
            print(f"done: {summary['steps']} steps; metrics {summary['metrics_file']}; model {summary['final_model']}")
    elif args.command == "eval":
        from cepo.evaluate import evaluate_directory

        print(f"accuracy {evaluate_directory(args.model, args.data, args.overrides):.4f}")
    elif args.command == "export":
        from cepo.export import export_model

        print(export_model(args.src, args.out, merge_lora=args.merge_lora))
    elif args.command == "compare":
        from cepo.compare import parse_algorithms, run_compare

        if args.seeds < 1:
            raise ValueError(f"--seeds: expected >= 1, got {args.seeds}")
        algos = parse_algorithms(args.algorithms)
        if args.baseline not in algos:
            raise ValueError(f"--baseline {args.baseline!r} is not among --algorithms {args.algorithms!r}")
        seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
        run_compare(
            args.config,
            args.overrides,
            algos,
            seeds,
            args.out,
            jobs=args.jobs,
            summary_only=args.summary_only,
            baseline=args.baseline,
        )
        print(f"summary: {os.path.join(args.out, 'summary.md')} (also summary.json, curves.png)")
    elif args.command == "viz":
        from cepo.viz import visualize

        for path in visualize(
            args.run_dir, step=args.step, out=args.out, png=args.png, max_groups=args.groups, color=args.color
        ):
            print(path)
    return 0


def _finish_distributed() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


def _local_rank(args) -> None:
    """``--local_rank N`` (from the ``deepspeed`` launcher) becomes ``LOCAL_RANK`` unless that is set."""
    value = args.local_rank if getattr(args, "local_rank", None) is not None else args.local_rank_top
    if value is None:
        return
    if value < 0:
        raise SystemExit(f"cepo {args.command}: error: --local_rank: expected >= 0, got {value}")
    os.environ.setdefault("LOCAL_RANK", str(value))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    _local_rank(args)
    debug = args.debug or args.debug_top or os.environ.get("CEPO_DEBUG", "") not in ("", "0")
    try:
        return _run(args)
    except USER_ERRORS as exc:
        if debug:
            raise
        _finish_distributed()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"cepo {args.command}: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from cepo.engine import DistributedSetupError

        if debug or not isinstance(exc, DistributedSetupError):
            raise
        print(f"cepo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cepo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
