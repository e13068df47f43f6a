"""The ``vgmr-fast`` command: ``check`` | ``bench`` | ``train``.

- ``vgmr-fast check``: every fused backend that runs here against the reference, forward and
  backward, over a fixed grid of shapes and dtypes; a pass/fail table; exit status 1 on any failure.
- ``vgmr-fast bench``: per-op, layer and end-to-end (the paper's Table 7) figures on the default
  device, each as a ratio against a peer measured in the same run; JSON + markdown + PNG.
- ``vgmr-fast train``: training runs (``vgmr_fast.train``).

Subcommand modules are imported only when their subcommand runs, so ``vgmr-fast check`` works
without matplotlib and ``vgmr-fast bench`` without the training code.
"""
from __future__ import annotations

import argparse
import sys


def _train_module():
    import importlib

    return importlib.import_module("vgmr_fast.train")


def build_parser(argv=None) -> argparse.ArgumentParser:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="vgmr-fast",
        description="Fused kernels for the Value-Gated Modality Refiner: check correctness, benchmark, train.",
    )
    try:
        from . import __version__
    except ImportError:  # pragma: no cover
        __version__ = "?"
    parser.add_argument("--version", action="version", version=f"vgmr-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{check,bench,train}")

    p_check = sub.add_parser("check", help="fused backends vs the reference on this machine (pass/fail table)",
                             description="Compare every fused backend available here with the reference, "
                                         "forward and backward, over a fixed grid of shapes and dtypes.")
    from .check import add_check_arguments

    add_check_arguments(p_check)

    p_bench = sub.add_parser("bench", help="per-op, layer and end-to-end benchmarks on the default device",
                             description="Benchmark the fused VGMR against the eager reference, torch.compile "
                                         "of the reference and floors measured in the same run.")
    from .bench.suite import add_bench_arguments

    add_bench_arguments(p_bench)

    p_train = sub.add_parser("train", help="train the backbones with and without VGMR (vgmr_fast.train)",
                             description="Training runs; see the vgmr_fast.train package.")
    p_train.set_defaults(_train_error=None)
    # The train options come from vgmr_fast.train; import it only when `train` is the command.
    if _first_positional(argv) == "train":
        try:
            mod = _train_module()
            mod.add_train_arguments(p_train)
        except Exception as exc:  # noqa: BLE001  (missing module, or missing add_train_arguments)
            p_train.set_defaults(_train_error=f"{type(exc).__name__}: {exc}")
            p_train.description = ("NOT AVAILABLE in this install: vgmr_fast.train could not be loaded "
                                   f"({type(exc).__name__}: {exc}).")
            p_train.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _first_positional(argv) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "check":
        from .check import run_check

        return int(run_check(args) or 0)
    if args.command == "bench":
        from .bench.suite import run_bench

        return int(run_bench(args) or 0)
    if args.command == "train":
        if getattr(args, "_train_error", None):
            print("vgmr-fast train: the training code (vgmr_fast.train) is not available in this install: "
                  f"{args._train_error}", file=sys.stderr)
            return 2
        return int(_train_module().run_train(args) or 0)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
