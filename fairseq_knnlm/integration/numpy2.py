"""The one change to the outside world this package makes at import, for fairseq itself.

fairseq's TokenBlockDataset with break_mode="eos" -- the dataset of every
fairseq-interactive prompt and hub sample()/score() sentence -- still spells
int64 as ``np.compat.long``, which NumPy 2 removed.  Restoring that one name
lets fairseq build those datasets; it changes nothing under NumPy 1.
"""

import types

import numpy as np


def numpy2_compat() -> None:
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=np.int64)
