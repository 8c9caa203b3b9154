"""kNN-LM as a language model for generation: sampling, beam search and hub scoring.

fairseq's generators (``SequenceGenerator`` for sampling and beam search,
``SequenceScorer`` for the hub's ``score()``) turn a decoder's output into a
distribution by calling ``model.get_normalized_probs``.  :func:`attach_knnlm`
replaces that method on one model instance with the kNN-LM's: the LM's
distribution interpolated in log space with the full-vocabulary kNN
distribution of the hidden state that produced it.  No fairseq code is
copied or changed; the task's ``build_generator`` attaches every model it is
handed when ``--knnlm`` is on.

Keys come from forward hooks, so they are whatever the decoder just computed:
during incremental decoding that is only the new step of every hypothesis,
and those rows go through the kNN-LM pipeline (:mod:`fairseq_knnlm.scoring.pipeline`),
one FAISS call per step, with the task's settings of the moment.
"""

from typing import Optional

import torch

from ..retrieval.base import Batch
from ..scoring.knn_math import knnlm_log_probs  # noqa: F401  (its documented import path)
from ..scoring.pipeline import PipelineStats
from ..errors import UserError
from .keys import check_keytype, key_dim, last_ffn_module

_ATTR = "_knnlm_generation"  # where attach_knnlm keeps its state on a model


class GenerationError(UserError):
    pass


# ------------------------------------------------------------------- the keys
class StepKeys:
    """The kNN key of every position of the decoder's last forward pass.

    A forward pass may be a single incremental step (T = 1) or a whole
    prefix; either way the generator hands ``get_normalized_probs`` the last
    ``t`` positions of it, so :meth:`take` returns the last ``t`` keys.
    """

    def __init__(self, model, keytype: str):
        check_keytype(keytype)
        self._keys: Optional[torch.Tensor] = None  # (B, T, dim), batch-first
        decoder = model.decoder
        if keytype == "last_ffn_input":
            # Decoder layers run time-first (T x B x C).
            hook = last_ffn_module(model).register_forward_pre_hook(self._time_first_input)
        elif _projection(decoder) is not None:
            # The output projection's input is the decoder's features, batch-first.
            hook = _projection(decoder).register_forward_pre_hook(self._batch_first_input)
        else:
            # Adaptive softmax: the features are the decoder's output itself,
            # which SequenceGenerator divides in place by its temperature, so
            # they are copied where they are made.
            module, time_first = _features_module(model)
            self._time_first = time_first
            hook = module.register_forward_hook(self._features_output)
        self._handle = hook

    def _time_first_input(self, module, inputs):
        self._keys = inputs[0].transpose(0, 1)

    def _batch_first_input(self, module, inputs):
        self._keys = inputs[0]

    def _features_output(self, module, inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        self._keys = (x.transpose(0, 1) if self._time_first else x).detach().clone()

    def take(self, bsz: int, tsz: int) -> torch.Tensor:
        """Keys of the last ``tsz`` positions of the ``bsz`` rows just decoded."""
        keys = self._keys
        if keys is None or keys.size(0) != bsz or keys.size(1) < tsz:
            got = None if keys is None else tuple(keys.shape[:2])
            raise RuntimeError(
                f"kNN-LM: the decoder's last forward pass gave keys for {got} "
                f"(batch, time) positions, but probabilities were asked for {(bsz, tsz)}"
            )
        return keys[:, keys.size(1) - tsz :]

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _projection(decoder) -> Optional[torch.nn.Linear]:
    """The vocabulary projection of a decoder without adaptive softmax, if any."""
    if getattr(decoder, "adaptive_softmax", None) is not None:
        return None
    proj = getattr(decoder, "output_projection", None)
    return proj if isinstance(proj, torch.nn.Linear) else None


def _features_module(model):
    """(module, time_first): the last module of a transformer decoder's features.

    Mirrors the end of TransformerDecoder.extract_features: project_out_dim
    (batch-first), else the final layer_norm (time-first), else the last layer.
    """
    decoder = model.decoder
    if getattr(decoder, "project_out_dim", None) is not None:
        return decoder.project_out_dim, False
    if getattr(decoder, "layer_norm", None) is not None:
        return decoder.layer_norm, True
    layers = getattr(decoder, "layers", None)
    if layers:
        return layers[-1], True
    raise GenerationError(
        f"cannot find where {type(model).__name__} computes its features for "
        "--knn-keytype last_layer_output; use --knn-keytype last_ffn_input"
    )


# ------------------------------------------------------------- the attachment
class _Attachment:
    """What a kNN-LM model carries: the task (for its live settings) and its key hooks."""

    def __init__(self, model, task, original):
        self.task = task
        self.original = original
        self.keys = StepKeys(model, task.args.knn_keytype)
        # searches: FAISS calls made, one per decoder step; selected/decided: rows under
        # --knn-retrieval-predictor
        self.stats = PipelineStats()

    def normalized_probs(self, net_output, log_probs, sample=None):
        lm_lp = self.original(net_output, log_probs=True, sample=sample)
        if self.task.args.lmbda == 0:
            # The plain LM, bit for bit, and no search.
            return lm_lp if log_probs else lm_lp.exp()
        bsz, tsz, vocab = lm_lp.shape
        queries = self.keys.take(bsz, tsz).reshape(bsz * tsz, -1)
        # built at every call: the task's λ, temperature and predictor may change between calls
        pipeline = self.task.knnlm.pipeline(self.task.args.lmbda, self.task.args.knn_temp, self.stats)
        mixed = pipeline.vocab_log_probs(Batch(queries, lm_lp.reshape(bsz * tsz, vocab))).view(bsz, tsz, vocab)
        return mixed if log_probs else mixed.exp()


def retrieval_counts(model):
    """(rows searched, rows decided) under --knn-retrieval-predictor since attaching ((0, 0) otherwise)."""
    attached = getattr(model, _ATTR, None)
    return (attached.stats.selected, attached.stats.decided) if attached is not None else (0, 0)


def attach_knnlm(model, task) -> None:
    """Make ``model.get_normalized_probs`` return the kNN-LM's distribution.

    ``task`` is a knnlm_language_modeling task set up with ``--knnlm`` (its
    ``knnlm`` holds the retriever); λ, the kNN temperature and the retriever are
    read from it at every call.  Attaching again only rebinds the task.
    """
    if getattr(task, "knnlm", None) is None:
        raise GenerationError("kNN-LM generation needs the task set up with --knnlm --dstore DIR")
    if getattr(task.args, "knn_pointers", False):
        # Pointers need each hypothesis's previous neighbours and chosen token, which
        # fairseq's generators do not hand to get_normalized_probs.
        raise GenerationError("--knn-pointers is for scoring text with fairseq-eval-lm; "
                              "generate without --knn-pointers")
    datastore = task.knnlm.datastore
    if key_dim(model, task.args.knn_keytype) != datastore.dim:
        raise GenerationError(
            f"the model's {task.args.knn_keytype} keys have dimension "
            f"{key_dim(model, task.args.knn_keytype)} but datastore {task.args.dstore} has "
            f"{datastore.dim}; use the datastore built with this model"
        )
    attached = getattr(model, _ATTR, None)
    if attached is not None:
        attached.task = task
        return
    attached = _Attachment(model, task, model.get_normalized_probs)
    # An instance attribute shadows the class's method for every caller.
    object.__setattr__(model, _ATTR, attached)
    object.__setattr__(model, "get_normalized_probs", attached.normalized_probs)


def detach_knnlm(model) -> None:
    """Undo :func:`attach_knnlm`: the model is the plain LM again."""
    attached = getattr(model, _ATTR, None)
    if attached is None:
        return
    attached.keys.remove()
    del model.__dict__["get_normalized_probs"]
    del model.__dict__[_ATTR]


def is_attached(model) -> bool:
    return getattr(model, _ATTR, None) is not None


def search_count(model) -> int:
    """How many FAISS searches the attached model has made (0 if not attached)."""
    attached = getattr(model, _ATTR, None)
    return attached.stats.searches if attached is not None else 0
