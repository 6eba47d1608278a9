"""The ``dymu`` command line.

    dymu demo      the main job (for now: the op demo on realistic shapes)
    dymu opdemo    every op on realistic shapes with every available backend
    dymu info      available backends and versions
"""

import argparse
import json
import sys


def _cmd_opdemo(args) -> int:
    from .opdemo import main as opdemo

    return opdemo(args.device)


def _cmd_info(args) -> int:
    from dymu_kernels._backends import describe

    print(json.dumps(describe(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dymu", description="DyMU: dynamic token merging and virtual token unmerging for VLMs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, helptext in (("demo", "run the main demo"), ("opdemo", "run every op on realistic shapes with every backend")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")
        p.set_defaults(func=_cmd_opdemo)
    p = sub.add_parser("info", help="print available backends and versions")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
