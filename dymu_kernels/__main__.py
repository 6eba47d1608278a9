"""``python -m dymu_kernels``: print which backends are available, why not, and versions."""

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    return _Parser(
        prog="python -m dymu_kernels",
        description="Print, as JSON, which dymu_kernels backends (reference, native, triton) are available "
                    "on this machine and why not, which ops each implements, and the versions of python, "
                    "torch and triton.",
        epilog="Environment: DYMU_BACKEND forces a backend, TRITON_INTERPRET=1 runs Triton kernels on CPU "
               "tensors (tests), DYMU_DEBUG=1 shows the traceback of an unexpected error.",
    )


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    try:
        from ._backends import describe

        print(json.dumps(describe(), indent=2))
    except Exception as err:
        if os.environ.get("DYMU_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"python -m dymu_kernels: failed: {type(err).__name__}: {message} (DYMU_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
