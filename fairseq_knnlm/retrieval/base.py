"""The kNN-LM pipeline's interfaces: a search's result, a retriever, and the two stages
a retrieval idea plugs in as (:mod:`fairseq_knnlm.scoring.pipeline` runs them).

* A :class:`Selector` decides which rows of a batch get neighbours at all
  (adaptive retrieval, :class:`~fairseq_knnlm.retrieval.adaptive.PredictedRows`).
* A :class:`NeighbourSource` gives the selected rows their neighbours: a plain
  search (:class:`SearchNeighbours`, also over the ranks of a distributed
  index), or pointers that reuse the previous token's neighbours
  (:class:`~fairseq_knnlm.retrieval.pointers.PointerNeighbours`).

Rows not selected keep the LM's log-probability; the neighbours' weights and
the interpolation are the pipeline's (:mod:`fairseq_knnlm.scoring.knn_math`).
A new idea is one class, e.g. a selector that searches every other position::

    class EveryOther(Selector):
        def select(self, batch):
            return np.arange(len(batch.queries)) % 2 == 0

    KNNPipeline(SearchNeighbours(retriever), lmbda, temperature, selector=EveryOther())
"""

from abc import ABC, abstractmethod
from typing import NamedTuple, Optional

import numpy as np
import torch


class Neighbours(NamedTuple):
    """The k neighbours of each of n queries, best first.

    Slots the index could not fill have distance +inf, value -1 and id -1:
    they carry no weight and match no token.
    """

    dists: torch.Tensor  # (n, k) float32 kNN-LM distances, on the queries' device
    vals: torch.Tensor  # (n, k) int64 next tokens, on the queries' device
    counts: Optional[torch.Tensor] = None  # (n, k) int32 entry counts of a pruned store (1 in unfilled slots)
    ids: Optional[np.ndarray] = None  # (n, k) int64 datastore ids, where the source knows them

    def take(self, selection: "Selection") -> "Neighbours":
        """The neighbours of the selected rows only."""
        return Neighbours(
            self.dists[selection.rows],
            self.vals[selection.rows],
            None if self.counts is None else self.counts[selection.rows],
            None if self.ids is None else self.ids[selection.index],
        )


def search_neighbours(ids: np.ndarray, vals: np.ndarray, dists, counts: Optional[np.ndarray],
                      device) -> Neighbours:
    """A search's Neighbours from its ids (n, k) int64, the entries' values, kNN-LM distances
    (numpy or tensor) and counts (None for an unpruned store): unfilled slots (id -1) get
    distance +inf, value -1 and count 1, whatever the arrays held there."""
    missing = ids < 0
    vals = vals.astype(np.int64)
    vals[missing] = -1
    dists = torch.as_tensor(np.ascontiguousarray(dists) if isinstance(dists, np.ndarray) else dists)
    dists = dists.float().masked_fill(torch.from_numpy(missing), float("inf"))
    if counts is not None:
        counts = counts.astype(np.int32)
        counts[missing] = 1
        counts = torch.from_numpy(counts).to(device)
    return Neighbours(dists.to(device), torch.from_numpy(vals).to(device), counts, ids)


def faiss_distances(scores: np.ndarray, metric: str) -> np.ndarray:
    """kNN-LM distances from FAISS's scores: squared L2 as they are, inner products negated."""
    return scores if metric == "l2" else -scores


class Batch(NamedTuple):
    """What the pipeline's stages see of a batch of n positions."""

    queries: torch.Tensor  # (n, dim) kNN keys
    lm_lp: torch.Tensor  # (n,) log p_LM(target) when scoring text, (n, V) the LM's distribution in generation
    targets: Optional[torch.Tensor] = None  # (n,) the scored tokens (scoring text only)
    row_lengths: Optional[torch.Tensor] = None  # (rows,) consecutive positions of each sequence (scoring text)
    lm_features: Optional[torch.Tensor] = None  # (n, f) adaptive-retrieval features, where computed
    sample_ids: Optional[torch.Tensor] = None  # (rows,) fairseq sample ids: the continuous cache checks their order


class Selection(NamedTuple):
    """Some rows of a batch: a mask and the same rows as indices, for numpy and torch."""

    mask: np.ndarray  # (n,) bool
    index: np.ndarray  # (m,) int64, np.nonzero(mask)[0]
    rows: torch.Tensor  # (m,) int64, index on the queries' device

    @classmethod
    def of(cls, mask: np.ndarray, device) -> "Selection":
        index = np.nonzero(mask)[0]
        return cls(mask, index, torch.from_numpy(index).to(device))


class Retriever(ABC):
    """Searches a datastore's index: queries in, their k nearest entries out."""

    datastore: "object"  # the Datastore searched (its values, counts and metadata)
    k: int
    sim_func: str  # --knn-sim-func: faiss, l2 or ip
    metric: str  # the index's metric: l2 or ip
    candidates: int  # FAISS's results per query before exact re-ranking (k without --knn-candidates)
    nprobe: Optional[int]  # IVF lists probed per search (None without an IVF)
    queries_searched: int  # queries searched so far, for the end-of-run report

    @abstractmethod
    def search(self, queries: torch.Tensor) -> Neighbours:
        """queries (n, dim) -> their Neighbours, on the queries' device (ids as numpy)."""


class Selector(ABC):
    """Chooses the rows of a batch that get neighbours; the others keep the LM's log-probability."""

    @abstractmethod
    def select(self, batch: Batch) -> Optional[np.ndarray]:
        """(n,) bool numpy of the rows to give neighbours, or None for every row."""


class NeighbourSource(ABC):
    """Gives the selected rows of a batch their neighbours."""

    @abstractmethod
    def neighbours(self, batch: Batch, selection: Optional[Selection]) -> Neighbours:
        """Neighbours of the selected rows, in row order (``selection`` None: of every row)."""


class SearchNeighbours(NeighbourSource):
    """The plain kNN-LM: the selected rows searched together, in one call."""

    def __init__(self, retriever: Retriever):
        self.retriever = retriever

    def neighbours(self, batch: Batch, selection: Optional[Selection]) -> Neighbours:
        queries = batch.queries if selection is None else batch.queries[selection.rows]
        return self.retriever.search(queries)
