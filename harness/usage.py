"""Bad command-line input: one line on stderr, `run_bench.py: error: ...`, and exit code 2, never
a usage dump or a traceback. Every command of `run_bench.py` parses with `OneLineParser` and
ends through `usage_error`."""
from __future__ import annotations

import argparse
import sys

PREFIX = "run_bench.py: error:"


class UsageError(ValueError):
    """Bad command-line input (argparse's complaint, or a check of the parsed arguments)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises `UsageError` (its message naming the subcommand, if any) where it
    would print the usage and exit 2."""

    def error(self, message: str):
        command = self.prog.removeprefix("run_bench.py").strip()  # a subcommand's name
        raise UsageError(f"{command}: {message}" if command else message)


def usage_error(exc: BaseException) -> int:
    """Print `exc` as one line after `PREFIX`; returns the exit code of bad input, 2."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{PREFIX} {message}", file=sys.stderr)
    return 2
