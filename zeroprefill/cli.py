"""The ``zeroprefill`` command line: one entry point, one subcommand per job.

Subcommands register themselves in :data:`SUBCOMMANDS` with a function that adds their
arguments and a function that runs them, so each job lives in its own module and the
top-level parser stays small.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from zeroprefill import __version__


@dataclass(frozen=True)
class Subcommand:
    """A ``zeroprefill <name>`` job: how to parse its arguments and how to run it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (an option without help shows just that),
    unless the help already names one; descriptions keep their line breaks."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if any(marker in help_text for marker in ("%(default)", "(default", "default:")):
            return action.help
        return super()._get_help_string(action)


def _add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _run_info(args: argparse.Namespace) -> int:
    from zeroprefill.environment import collect_environment, format_environment

    report = collect_environment()
    if args.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(format_environment(report))
    return 0


def _from_module(module: str, help: str) -> Subcommand:
    """A subcommand whose ``add_arguments``/``run`` live in ``module``, imported only when used."""
    import importlib

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(module).add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module).run(args)

    return Subcommand(help=help, add_arguments=add_arguments, run=run)


SUBCOMMANDS: dict[str, Subcommand] = {
    "info": Subcommand(
        help="print torch/vLLM/SGLang/Triton versions and which backends are usable here",
        add_arguments=_add_info_arguments,
        run=_run_info,
    ),
    "tiny-model": _from_module(
        "zeroprefill.tiny_model",
        "generate a tiny random-weight MoE checkpoint with a trained tokenizer",
    ),
    "selftest": _from_module(
        "zeroprefill.selftest",
        "check AsyncEP over N gloo ranks against transformers' MoE blocks on a checkpoint",
    ),
    "demo": _from_module(
        "zeroprefill.demo",
        "start a DP=2 AsyncEP vLLM server on the tiny MoE, send embedding/score requests, check them",
    ),
    "router": _from_module(
        "zeroprefill.router.cli",
        "prefill-only gateway: true-FLOPs, prefix-aware, saturation-aware routing over replicas",
    ),
    "simulate": _from_module(
        "zeroprefill.simulate.cli",
        "discrete-event simulation of routing policies over N AsyncEP replicas",
    ),
    "plan": _from_module(
        "zeroprefill.plan",
        "saturation threshold, memory per GPU and predicted throughput of AsyncEP/EP/TP",
    ),
    "calibrate": _from_module(
        "zeroprefill.calibrate",
        "measure this machine's hardware profile (GEMM, HBM, AllGather, overlap tax)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zeroprefill",
        description="Prefill-only MoE serving: AsyncEP weight streaming and a true-FLOPs router.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zeroprefill {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, sub in SUBCOMMANDS.items():
        sub_parser = subparsers.add_parser(name, help=sub.help, description=sub.help, formatter_class=HelpFormatter)
        sub.add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return SUBCOMMANDS[args.command].run(args)
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
