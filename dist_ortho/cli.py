"""The `dist-ortho` command (also `python -m dist_ortho`): one program, several subcommands, one
grammar, `dist-ortho CMD [CONFIG] [--set KEY=VALUE]... [-o OUT]`:

    dist-ortho run     [launch/configs/tiny.yaml] [--set optimizer.lr=0.01]... [-o OUT]
    dist-ortho sweep   launch/configs/study.yaml [--set train.steps=3]... [-o OUT]
    dist-ortho study   [launch/configs/default_study.yaml] [--set ...]... [-o OUT]  sweep + report
    dist-ortho report  results/latest/<study> [-o OUT]      plots + report.md of a finished sweep
    dist-ortho project [--model llama-8b ...] [-o OUT]      cost model projected to large scale
    dist-ortho convergence launch/configs/convergence.yaml [--set ...]... [-o OUT]

`--set` takes one KEY=VALUE and repeats, so it never swallows CONFIG; `report` reads a results
folder instead of a config and `project` takes its inputs as flags, so neither has `--set`. Under
torchrun a run is `torchrun --nproc_per_node=N -m dist_ortho run CONFIG ...`.

Every subcommand lives in a module exposing `add_arguments(parser)` and `main(args) -> int`. Only
the module of the subcommand being run is imported, so a missing or broken module (say, the cost
model in an installation without it) affects its own subcommand only; a missing one says so.

Errors, the same for every command (`dist_ortho.core.commands.run_command`): a user mistake
(`UserError`: a config key, a flag, an output path that cannot be written) is ONE line on stderr,
`dist-ortho <command>: error: <key>: <what is wrong and the fix>`, exit status 2, no traceback;
anything else is a bug, reported in one line and then its traceback, exit status 1. SIGINT and
SIGTERM end a command with one line and exit status 130 / 143; the job runner
(`dist_ortho.studies.jobs`) first stops the running point's whole process tree and leaves it
incomplete. A run is a rank of a job, so SIGTERM keeps its default there.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dist_ortho.core.commands import run_command

__all__ = ["SUBCOMMANDS", "build_parser", "main", "run_command"]

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("dist_ortho.studies.run", "one profiled run (under torchrun, or a single process)"),
    "sweep": ("dist_ortho.studies.sweep", "launch a grid of torchrun runs and aggregate summary.csv"),
    "report": ("dist_ortho.reporting.report", "plots and report.md for a sweep's results directory"),
    "study": ("dist_ortho.studies.sweep:study", "the default scaling study: sweep, then report"),
    "project": ("dist_ortho.studies.project", "cost model: project step time and bytes to large scale"),
    "convergence": ("dist_ortho.studies.convergence", "loss-vs-steps study of NorMuon, Muon and AdamW"),
    "exact-or-not": ("dist_ortho.studies.convergence.exact_or_not",
                     "the inexact schedules beside the exact one: deviation, time, loss gap"),
    "exchange": ("dist_ortho.studies.exchange_project",
                 "cost model: flat vs two-level (node-aware) exchange per world size"),
}

# commands that run as the ranks of a job: torchrun and the job runner stop them with SIGTERM
RANK_COMMANDS = {"run"}


def _load(target: str):
    """(add_arguments, main) of a subcommand; `module:prefix` picks `<prefix>_add_arguments`."""
    module_name, _, prefix = target.partition(":")
    module = importlib.import_module(module_name)
    pre = f"{prefix}_" if prefix else ""
    return getattr(module, f"{pre}add_arguments"), getattr(module, f"{pre}main")


def _missing(name: str, module: str, exc: ImportError):
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.set_defaults(_takes_anything=True)  # its own arguments are unknown here

    def main(args: argparse.Namespace) -> int:
        print(f"dist-ortho {name}: not available in this installation: {module} could not be "
              f"imported ({exc}).", file=sys.stderr)
        return 2

    return add_arguments, main


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser, with subcommand `only` fully loaded; the others are listed but their modules
    are not imported."""
    parser = argparse.ArgumentParser(
        prog="dist-ortho", description="NorMuon under FSDP2: runs, sweeps, reports.",
        epilog="`dist-ortho <command> --help` describes each command.")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (target, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if only is not None and name != only:
            continue
        module = target.partition(":")[0]
        try:
            add_arguments, main_fn = _load(target)
        except ImportError as exc:
            # Only a missing module itself counts as "not available"; an ImportError raised
            # inside an existing module is a real bug and must surface.
            if exc.name != module:
                raise
            add_arguments, main_fn = _missing(name, module, exc)
        add_arguments(sub)
        sub.set_defaults(_main=main_fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The top level takes no option values, so the first known word is the subcommand; without
    # one, argparse prints the top-level help or error and exits before anything is needed.
    only = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = build_parser(only)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "_takes_anything", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return run_command(args.command, args._main, args, sigterm=args.command not in RANK_COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
