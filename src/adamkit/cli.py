"""The ``adamkit`` command: ``adamkit demo`` (the Adam story, with pictures) and ``adamkit bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adamkit",
        description="The Adam optimizer family, written once: NumPy, PyTorch and compiled CPU kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("demo", help="run the experiments that make Adam's math visible and write an HTML report "
                                "(adamkit demo --help for options)", add_help=False)
    sub.add_parser("bench", help="measure every optimizer step against torch.optim and the memory floor "
                                 "(adamkit bench --help for options)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    from .bench import main as bench_main
    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
