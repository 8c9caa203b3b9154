"""The index's errors, and the command their messages point to."""

from ..errors import UserError

PROG = "fairseq-knnlm-build-index"


class IndexBuildError(UserError):
    """An index cannot be built or used as asked; the message says what to do."""


class IndexMismatchError(IndexBuildError):
    """An index that was not built for the datastore it is used with."""
