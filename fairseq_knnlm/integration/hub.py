"""The fairseq hub for kNN-LM: ``from_pretrained`` and the task override it builds."""

import os

from .config import KNNLanguageModelingConfig
from .generation import GenerationError

def from_pretrained(
    model_name_or_path: str,
    checkpoint_file: str = "checkpoint_best.pt",
    data_name_or_path: str = ".",
    **overrides,
):
    """A fairseq hub interface (``sample()``, ``score()``, ``generate()``) for kNN-LM.

    ``overrides`` are task options (``dstore=``, ``k=``, ``lmbda=``,
    ``knn_temp=`` ... as on the command line) and any other fairseq option.
    ``knnlm`` defaults to True when ``dstore`` is given.  Example::

        lm = from_pretrained("ckpt", "checkpoint_best.pt", "data-bin",
                             dstore="dstore", k=64, lmbda=0.25)
        lm.sample("The castle was", beam=1, sampling=True, max_len_b=30)
    """
    from fairseq import file_utils, hub_utils

    # The task= dict stops fairseq from setting the task's data itself, so
    # resolve it the way hub_utils.from_pretrained does.
    model_path = file_utils.load_archive_file(model_name_or_path)
    if data_name_or_path.startswith("."):
        data = os.path.abspath(os.path.join(model_path, data_name_or_path))
    else:
        data = file_utils.load_archive_file(data_name_or_path)
    task_overrides = knnlm_task_overrides(data=data, **overrides)
    rest = {k: v for k, v in overrides.items() if k not in task_overrides}
    rest.setdefault("user_dir", _user_dir())
    loaded = hub_utils.from_pretrained(
        model_name_or_path, checkpoint_file, data_name_or_path, task=task_overrides, **rest
    )
    return hub_utils.GeneratorHubInterface(loaded["args"], loaded["task"], loaded["models"])


def knnlm_task_overrides(**options) -> dict:
    """The ``task=`` override that switches a language_modeling checkpoint to kNN-LM.

    fairseq's hub applies a plain ``task="name"`` only to checkpoints saved
    without a task config; a dict with ``_name`` replaces the task of any
    checkpoint, and task options must travel inside it (options the
    checkpoint's own task lacks, such as ``dstore``, are otherwise dropped).
    Pass the result as ``task=`` to ``TransformerLanguageModel.from_pretrained``.
    """
    if "task" in options:
        raise GenerationError("pass kNN-LM task options as keywords (dstore=..., lmbda=...), not task=")
    fields = KNNLanguageModelingConfig.__dataclass_fields__
    task = {"_name": "knnlm_language_modeling"}
    task.update({k: v for k, v in options.items() if k in fields})
    if task.get("dstore") is not None:
        task.setdefault("knnlm", True)
    return task


def _user_dir() -> str:
    """The package directory, which fairseq imports as --user-dir."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
