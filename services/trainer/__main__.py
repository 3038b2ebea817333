"""``python -m services.trainer detector --out M.onnx [--steps N] [--seed S]``: re-train the demo detector."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from services.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen training task."""
    parser = argparse.ArgumentParser(prog="python -m services.trainer", description=__doc__)
    tasks = parser.add_subparsers(dest="task", required=True)
    detector = tasks.add_parser(
        "detector", help="train the demo detector on synthetic scenes and export ONNX"
    )
    detector.add_argument(
        "--out", required=True, help="where to write the .onnx (PNG and JSON land beside it)"
    )
    detector.add_argument("--steps", type=int, help="training steps (default: the shipped model's)")
    detector.add_argument("--seed", type=int, help="seed of the scenes and the weights")
    detector.add_argument("--batch-size", type=int, help="crops per step")
    detector.add_argument("--threads", type=int, help="torch threads (default: every core)")
    args = parser.parse_args(argv)

    # Import torch only for a task that trains: `--help` stays quick.
    from dataclasses import replace

    from services.trainer.train_detector import TrainSettings, retrain

    settings = TrainSettings()
    changes = {
        name: getattr(args, name)
        for name in ("steps", "seed", "batch_size", "threads")
        if getattr(args, name) is not None
    }
    for name in ("steps", "batch_size"):
        if name in changes and changes[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {changes[name]}")
    retrain(args.out, replace(settings, **changes))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
