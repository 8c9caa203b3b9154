"""kNN-LM for fairseq: pass this package to fairseq with ``--user-dir``."""

__version__ = "0.1.0"

from .errors import install_excepthook

install_excepthook()

from . import task  # noqa: E402,F401  registers knnlm_language_modeling
from .generation import numpy2_compat  # noqa: E402,F401  fairseq eos-mode datasets under NumPy 2
