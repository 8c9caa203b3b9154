"""fairseq's reads of artefacts that tools outside the eval loop check: a
dictionary, a binarized split, a checkpoint's key dimension.

Each turns the failures that mean "not this file" into a one-line error of
the caller's class (``error``) ending with the caller's ``fix``; anything
else (a bug, MemoryError) propagates as it is.
"""

import os
import pickle

import numpy as np
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.data.indexed_dataset import MMapIndexedDataset, data_file_path, index_file_path

from ..errors import UserError, first_line
from .keys import key_dim


def load_dictionary(path: str, error=UserError, fix: str = "pass the model's dict.txt") -> Dictionary:
    """The fairseq Dictionary stored at ``path`` (a dict.txt)."""
    if not os.path.isfile(path):
        raise error(f"no {path}; {fix}")
    try:
        return Dictionary.load(path)
    except (OSError, ValueError, RuntimeError) as e:  # fairseq's refusals of a malformed dict.txt
        raise error(f"{path} is not a fairseq dictionary ({first_line(e)}); {fix}") from None


def split_tokens(data: str, split: str, error=UserError) -> np.ndarray:
    """The binarized split's tokens in corpus order (a memory map): with
    ``--sample-break-mode none`` these are the language model's targets."""
    prefix = os.path.join(data, split)
    fix = "pass the data-bin directory (fairseq-preprocess output) and --gen-subset the datastore was made from"
    if not MMapIndexedDataset.exists(prefix):
        raise error(f"no binarized split {prefix}.bin/.idx; {fix}")
    try:
        index = MMapIndexedDataset.Index(index_file_path(prefix))
    except (AssertionError, ValueError, OSError):
        raise error(f"{prefix}.idx is not in fairseq's mmap format; {fix}") from None
    try:
        tokens = np.memmap(data_file_path(prefix), dtype=index.dtype, mode="r")
    except (OSError, ValueError):  # e.g. an empty .bin
        raise error(f"{prefix}.bin is unreadable; binarize the split again") from None
    if len(tokens) != int(np.sum(index.sizes, dtype=np.int64)):
        raise error(f"{prefix}.bin does not match {prefix}.idx; binarize the split again")
    return tokens


def model_key_dim(checkpoint: str, data: str, keytype: str, error=UserError) -> int:
    """Dimension of the model's ``keytype`` keys; loading the model with ``data``'s
    dictionary also proves the two belong together."""
    use = "pass the model the datastore was made with to --path"
    if not os.path.isfile(checkpoint):
        raise error(f"no checkpoint {checkpoint}; {use}")
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint, arg_overrides={"data": data})
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as e:  # torch.load's refusals
        raise error(f"cannot read checkpoint {checkpoint} ({first_line(e)}): it is damaged or not a "
                    f"checkpoint; {use}") from None
    except KeyError as e:  # fairseq's upgrade of old checkpoints reads fields a foreign file lacks
        raise error(f"{checkpoint} is not a fairseq checkpoint (no field {e}); {use}") from None
    if not isinstance(state, dict) or "model" not in state or state.get("cfg", state.get("args")) is None:
        raise error(f"{checkpoint} is not a fairseq checkpoint (no model and cfg); {use}")
    try:
        models, _ = checkpoint_utils.load_model_ensemble([checkpoint], arg_overrides={"data": data}, state=state)
    except RuntimeError as e:
        if "state_dict" not in str(e):  # only torch's refusal of the weights means another dictionary
            raise
        raise error(
            f"cannot load {checkpoint} with the dictionary of {data} ({first_line(e)}); pass the model "
            "and the data-bin the datastore was made with"
        ) from None
    return key_dim(models[0], keytype)
