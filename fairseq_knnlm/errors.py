"""User-facing errors, and how the command-line tools print them (one line, exit 2).

Nothing here runs at import: our CLIs report errors through
:func:`fairseq_knnlm.cli.common.run_reporting_errors`, and the task installs
:func:`install_excepthook` only when fairseq's own CLIs parse its options, so a
program that uses the package as a library sees ordinary exceptions.
"""

import sys


class UserError(ValueError):
    """Bad input or settings; the message says what to do."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The useful first line of an exception's message, for a one-line error.

    FAISS's C++ exceptions carry the source location before ``failed: `` or
    ``Error: ``; only what follows is kept.  An empty message gives the type's name.
    """
    text = str(error).strip()
    if not text:
        return type(error).__name__
    text = text.splitlines()[0]
    for marker in ("failed: ", "Error: "):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    return text.strip()[:limit]


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
    ``prog: error: message`` (exit 2) instead of a traceback.  For fairseq's CLIs:
    the task calls it when they parse its options."""
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
