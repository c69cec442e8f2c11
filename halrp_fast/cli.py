"""``halrp-fast`` command line."""
from __future__ import annotations

import argparse
import sys


def _cmd_env(args: argparse.Namespace) -> int:
    from . import env_report

    print(env_report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="halrp-fast", description="HALRP continual learning with fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="which implementation serves each op on each device, and why")
    env.set_defaults(func=_cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
