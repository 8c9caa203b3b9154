"""User-facing errors: printed as one line by the command-line tools."""

import sys


class UserError(ValueError):
    """Bad input or settings; the message says what to do."""


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def child_user_error(exc: BaseException):
    """The message of a UserError that ended a child process, or None.

    fairseq's multi-GPU runs (torch.multiprocessing.spawn) hand a child's
    exception to the parent as text, ``ProcessRaisedException``, whose last
    line is ``module.ErrorClass: message``.
    """
    if type(exc).__name__ != "ProcessRaisedException":
        return None
    lines = [line for line in str(exc).splitlines() if line.strip()]
    name, _, message = (lines[-1] if lines else "").partition(": ")
    known = {f"{c.__module__}.{c.__qualname__}" for c in _subclasses(UserError)}
    return message if name in known and message else None


def install_excepthook(prog: str = "fairseq-knnlm") -> None:
    """Print UserErrors (also those of fairseq's spawned worker processes) as
    ``prog: error: message`` (exit 2) instead of a traceback."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        message = str(exc) if issubclass(exc_type, UserError) else child_user_error(exc)
        if message is not None:
            # The process's own stderr: torch.distributed's excepthook swaps sys.stderr
            # for a buffer that it never prints once this hook exits.
            stream = sys.__stderr__ or sys.stderr
            print(f"{prog}: error: {message}", file=stream)
            stream.flush()
            sys.exit(2)
        previous(exc_type, exc, tb)

    if getattr(sys.excepthook, "__name__", "") != "hook":
        sys.excepthook = hook
