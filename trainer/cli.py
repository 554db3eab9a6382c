"""The `train` command line, one definition for `longer train` (longer_cli/main.py adds it as a
subcommand) and `torchrun --nproc_per_node N -m trainer ...` (`main`), so the trainer runs
without the CLI package above it."""

from __future__ import annotations

import argparse
import json
import sys

from longer.errors import LongerError

USER_ERRORS = (LongerError,)  # what exits 2 with one line; anything else is a bug


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", required=True, help="TOML file with [model] and [train] tables")
    s.add_argument("--data", required=True, help="dataset directory from `longer build`")
    s.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, tb/, export/")
    s.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    s.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume if the run has a complete checkpoint, else "
        "start from step 0 (also over a start of the same config that died before its first "
        "checkpoint): for restarts with the original arguments, e.g. torchrun elastic",
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it holds a run: the new run trains "
        "in a hidden sibling directory and replaces the old one only once it has finished",
    )
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="e.g. model.merge_k=4 train.lr=1e-3"
    )


def run(a: argparse.Namespace) -> dict | None:
    """Train as the parsed arguments say; the summary on rank 0, None on the others."""
    from .config import RunConfig
    from .distributed import shutdown
    from .train import train

    try:
        return train(
            RunConfig.load(a.config, a.overrides),
            a.data,
            a.out,
            resume=a.resume,
            progress=not a.quiet,
            auto_resume=a.auto_resume,
            overwrite=a.overwrite,
        )
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer`: a user error is one line and exit status 2, a bug its traceback."""
    p = argparse.ArgumentParser(prog="trainer", description="train a model (one process per rank)")
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        result = run(a)
    except USER_ERRORS as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    if result is not None:  # None: a non-zero rank
        print(json.dumps(result, indent=2, default=str))
    return 0
