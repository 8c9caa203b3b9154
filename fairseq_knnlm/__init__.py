"""kNN-LM for fairseq: pass this package to fairseq with ``--user-dir``.

Importing it registers the task ``knnlm_language_modeling`` with fairseq and
applies the NumPy 2 shim fairseq needs (``integration/numpy2.py``); nothing else.
"""

__version__ = "0.1.0"

from .integration.numpy2 import numpy2_compat

numpy2_compat()

from .integration import task  # noqa: E402,F401  registers knnlm_language_modeling
