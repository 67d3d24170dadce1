"""``cepo`` command line: argument parsing only; the work is in train / evaluate / export."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cepo", description="CEPO / RLSD / GRPO fine-tuning on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train from a YAML config", description="cepo train CONFIG.yaml [key=value ...] [--resume]"
    )
    p.add_argument("config", help="YAML config file (see docs/trainer.md)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.group_size=8")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")

    p = sub.add_parser("eval", help="greedy accuracy of a model directory on a data file")
    p.add_argument("model", help="Hugging Face model directory")
    p.add_argument("data", help=".jsonl / .parquet / .csv with question and answer fields")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.question_field=problem")

    p = sub.add_parser("export", help="write a Hugging Face model directory from a run or checkpoint")
    p.add_argument("src", help="run directory, checkpoint directory or hf/ directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the base weights")

    args = parser.parse_args(argv)
    if args.command == "train":
        from cepo.train import run_from_config

        summary = run_from_config(args.config, args.overrides, resume=args.resume)
        print(f"done: {summary['steps']} steps; metrics {summary['metrics_file']}; model {summary['final_model']}")
    elif args.command == "eval":
        from cepo.evaluate import evaluate_directory

        print(f"accuracy {evaluate_directory(args.model, args.data, args.overrides):.4f}")
    elif args.command == "export":
        from cepo.export import export_model

        print(export_model(args.src, args.out, merge_lora=args.merge_lora))
    return 0


if __name__ == "__main__":
    sys.exit(main())
