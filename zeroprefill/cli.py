"""The ``zeroprefill`` command line: one entry point, one subcommand per job.

Subcommands register themselves in :data:`SUBCOMMANDS` with a function that adds their
arguments and a function that runs them, so each job lives in its own module and the
top-level parser stays small.
"""

from __future__ import annotations

import argparse
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


def _lazy(module: str, attribute: str) -> Callable:
    """A function from a subcommand module, imported only when that subcommand runs."""

    def call(*args):
        import importlib

        return getattr(importlib.import_module(module), attribute)(*args)

    return call


SUBCOMMANDS: dict[str, Subcommand] = {
    "info": Subcommand(
        help="print torch/vLLM/SGLang/Triton versions and which backends are usable here",
        add_arguments=_add_info_arguments,
        run=_run_info,
    ),
    "tiny-model": Subcommand(
        help="generate a tiny random-weight MoE checkpoint with a trained tokenizer",
        add_arguments=_lazy("zeroprefill.tiny_model", "add_arguments"),
        run=_lazy("zeroprefill.tiny_model", "run"),
    ),
    "selftest": Subcommand(
        help="check AsyncEP over N gloo ranks against transformers' MoE blocks on a checkpoint",
        add_arguments=_lazy("zeroprefill.selftest", "add_arguments"),
        run=_lazy("zeroprefill.selftest", "run"),
    ),
    "demo": Subcommand(
        help="start a DP=2 AsyncEP vLLM server on the tiny MoE, send embedding/score requests, check them",
        add_arguments=_lazy("zeroprefill.demo", "add_arguments"),
        run=_lazy("zeroprefill.demo", "run"),
    ),
    "router": Subcommand(
        help="prefill-only gateway: true-FLOPs, prefix-aware, saturation-aware routing over replicas",
        add_arguments=_lazy("zeroprefill.router.cli", "add_arguments"),
        run=_lazy("zeroprefill.router.cli", "run"),
    ),
    "simulate": Subcommand(
        help="discrete-event simulation of routing policies over N AsyncEP replicas",
        add_arguments=_lazy("zeroprefill.simulate", "add_arguments"),
        run=_lazy("zeroprefill.simulate", "run"),
    ),
    "plan": Subcommand(
        help="saturation threshold, memory per GPU and predicted throughput of AsyncEP/EP/TP",
        add_arguments=_lazy("zeroprefill.plan", "add_arguments"),
        run=_lazy("zeroprefill.plan", "run"),
    ),
    "calibrate": Subcommand(
        help="measure this machine's hardware profile (GEMM, HBM, AllGather, overlap tax)",
        add_arguments=_lazy("zeroprefill.calibrate", "add_arguments"),
        run=_lazy("zeroprefill.calibrate", "run"),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zeroprefill",
        description="Prefill-only MoE serving: AsyncEP weight streaming and a true-FLOPs router.",
    )
    parser.add_argument("--version", action="version", version=f"zeroprefill {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, sub in SUBCOMMANDS.items():
        sub_parser = subparsers.add_parser(name, help=sub.help, description=sub.help)
        sub.add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return SUBCOMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
