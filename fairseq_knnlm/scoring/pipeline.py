"""The kNN-LM's work on one batch, for fairseq-eval-lm and for generation alike.

Read top to bottom, a batch goes through:

1. select: which rows get neighbours (a :class:`~fairseq_knnlm.retrieval.base.Selector`;
   without one, every row);
2. neighbours: the selected rows' neighbours from a
   :class:`~fairseq_knnlm.retrieval.base.NeighbourSource` (a plain or distributed
   search, or pointers);
3. p_kNN from the neighbours' distances (:mod:`knn_math`);
4. interpolation with the LM (the rows not selected keep the LM's log-probability);
5. the continuous cache (:mod:`cache`), when scoring text;
6. saving the neighbours (:class:`NeighboursSaver`), when asked.

:meth:`KNNPipeline.target_log_probs` gives the scored targets' log-probabilities
(n,) for eval-lm, :meth:`KNNPipeline.vocab_log_probs` the whole distribution
(n, V) for generation; both run the same select and neighbour stages.
λ = 0 without saving is the plain LM: nothing is selected or searched.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ..retrieval.adaptive import FEATURE_NAMES
from ..retrieval.base import Batch, NeighbourSource, Neighbours, Selection, Selector
from . import knn_math


@dataclass
class PipelineStats:
    """What a pipeline did, for the end-of-run report (kept across pipelines when shared)."""

    searches: int = 0  # neighbour-source calls: one FAISS search each for a plain search
    selected: int = 0  # rows a selector sent to the neighbour source
    decided: int = 0  # rows a selector decided on


class KNNPipeline:
    """One batch's kNN-LM stages, configured once (a run's: ``integration.knnlm.KNNLM.pipeline``)."""

    def __init__(self, source: Optional[NeighbourSource], lmbda: float, temperature: float,
                 selector: Optional[Selector] = None, cache=None, saver: Optional["NeighboursSaver"] = None,
                 stats: Optional[PipelineStats] = None):
        self.source = source  # None: the LM alone (e.g. with the continuous cache only)
        self.lmbda = lmbda
        self.temperature = temperature
        self.selector = selector
        self.cache = cache
        self.saver = saver
        self.stats = stats if stats is not None else PipelineStats()

    @torch.no_grad()  # grad mode is per thread: also when run by --knn-overlap's worker
    def target_log_probs(self, batch: Batch) -> torch.Tensor:
        """(n,) log-probabilities of ``batch.targets`` (``batch.lm_lp`` is (n,) log p_LM(target))."""
        scores = batch.lm_lp
        found = self._neighbours(batch)
        if found is not None:
            selection, neighbours = found
            targets = batch.targets if selection is None else batch.targets[selection.rows]
            knn_lp = knn_math.knn_target_log_probs(
                neighbours.dists, neighbours.vals, targets, self.temperature, neighbours.counts)
            scores = _mix(batch.lm_lp, selection, lambda lm: knn_math.interpolate(lm, knn_lp, self.lmbda))
        if self.cache is not None:  # in batch order, also under --knn-overlap
            scores = self.cache(batch.queries, batch.targets, scores, batch.sample_ids)
        if self.saver is not None and found is not None:
            self.saver(batch, *found)
        return scores

    def vocab_log_probs(self, batch: Batch) -> torch.Tensor:
        """(n, V) the kNN-LM's distribution (``batch.lm_lp`` is the LM's, (n, V) natural log)."""
        found = self._neighbours(batch)
        if found is None:
            return batch.lm_lp
        selection, neighbours = found
        return _mix(batch.lm_lp, selection, lambda lm: knn_math.knnlm_log_probs(
            lm, neighbours.dists, neighbours.vals, self.lmbda, self.temperature, neighbours.counts))

    def _neighbours(self, batch: Batch) -> Optional[Tuple[Optional[Selection], Neighbours]]:
        """(the selection, None for every row; its rows' neighbours), or None when no row needs any."""
        if self.source is None or (self.lmbda == 0 and self.saver is None):
            return None  # λ = 0 is the plain LM: skip the search entirely
        selection = None
        if self.selector is not None:
            mask = self.selector.select(batch)
            if mask is not None:
                self.stats.selected += int(mask.sum())
                self.stats.decided += len(mask)
                if not mask.any():
                    return None
                if not mask.all():
                    selection = Selection.of(mask, batch.queries.device)
        self.stats.searches += 1
        return selection, self.source.neighbours(batch, selection)


def _mix(lm_lp: torch.Tensor, selection: Optional[Selection], mix: Callable) -> torch.Tensor:
    """``mix(lm_lp)`` for the selected rows; the others keep the LM's log-probabilities."""
    if selection is None:
        return mix(lm_lp)
    out = lm_lp.clone()
    out[selection.rows] = mix(lm_lp[selection.rows])
    return out


class NeighboursSaver:
    """--knn-save-neighbors: each batch's neighbours and what the offline sweep needs to
    score them again (LM log-probabilities, row lengths, features, the keys when the
    continuous cache is on), appended to a NeighborsWriter opened at the first batch."""

    def __init__(self, path: str, k: int, info: Callable[[], dict], fp16_dists: bool = False,
                 overwrite: bool = False, with_queries: bool = False):
        self.path, self.k, self.info = path, k, info
        self.fp16_dists, self.overwrite, self.with_queries = fp16_dists, overwrite, with_queries
        self.writer = None

    def __call__(self, batch: Batch, selection: Optional[Selection], found: Neighbours) -> None:
        if selection is not None:  # the flags refuse saving with a selector
            raise RuntimeError("--knn-save-neighbors saves every token's neighbours, but only some were selected")
        keys = batch.queries if self.with_queries else None
        if self.writer is None:
            from ..storage.neighbors import NeighborsWriter

            self.writer = NeighborsWriter(
                self.path,
                self.k,
                self.info(),
                fp16_dists=self.fp16_dists,
                overwrite=self.overwrite,
                feature_names=FEATURE_NAMES if batch.lm_features is not None else None,
                with_counts=found.counts is not None,
                query_dim=None if keys is None else keys.size(-1),
            )
        self.writer.append(
            batch.targets.cpu().numpy(),
            batch.lm_lp.cpu().numpy(),
            found.dists.cpu().numpy(),
            found.vals.to(torch.int32).cpu().numpy(),
            # eval-lm sums scores per sequence in float32; the sweep repeats that exactly.
            lengths=batch.row_lengths.cpu().numpy(),
            lm_features=None if batch.lm_features is None else batch.lm_features.cpu().numpy(),
            counts=None if found.counts is None else found.counts.cpu().numpy(),
            queries=None if keys is None else keys.float().cpu().numpy(),
        )

    def commit(self) -> Optional[str]:
        """The saved file's path, or None if no batch was saved."""
        return None if self.writer is None else self.writer.commit()
