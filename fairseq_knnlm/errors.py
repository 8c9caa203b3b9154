"""User-facing errors: printed as one line by the command-line tools."""

import sys


class UserError(ValueError):
    """Bad input or settings; the message says what to do."""


def install_excepthook(prog: str = "fairseq-knnlm") -> None:
    """Print UserErrors as ``prog: error: message`` (exit 2) instead of a traceback."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, UserError):
            print(f"{prog}: error: {exc}", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(2)
        previous(exc_type, exc, tb)

    if getattr(sys.excepthook, "__name__", "") != "hook":
        sys.excepthook = hook
