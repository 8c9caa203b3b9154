"""What the command-line tools share: argument types and one-line error reporting."""

import argparse
from typing import Callable, TypeVar

from ..errors import UserError

T = TypeVar("T")


def count_at_least(minimum: int):
    """An argparse ``type``: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def run_reporting_errors(parser: argparse.ArgumentParser, work: Callable[[], T],
                         interrupted: str = "interrupted; rerun the same command") -> T:
    """``work()``; a UserError ends the program with ``prog: error: message`` (exit 2), and
    Ctrl-C with ``prog: <interrupted>`` (exit 130), never with a traceback."""
    try:
        return work()
    except UserError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: {interrupted}\n")
