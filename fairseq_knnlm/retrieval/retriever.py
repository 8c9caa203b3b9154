"""Nearest-neighbour retrieval: queries in, the Neighbours of their k nearest keys out."""

from typing import Optional

import faiss
import numpy as np
import torch

from ..storage.datastore import Datastore
from ..errors import UserError
from .base import Neighbours, Retriever, faiss_distances, search_neighbours

# Neighbour-key floats gathered at once when the keys cannot be read in place
# (float16 or sharded stores): 16 MiB, small enough for malloc to reuse.
GATHER_FLOATS = 1 << 22


class RetrievalConfigError(UserError):
    pass


class KNNRetriever(Retriever):
    """Searches a FAISS index over a datastore and returns kNN-LM distances.

    ``sim_func`` chooses the distances handed to the softmax:
    ``faiss`` the index's own (squared L2, or negated inner product for IP
    indexes; no key reads), ``l2`` exact squared L2 recomputed from the stored
    keys, ``ip`` exact negated inner products from the stored keys.
    ``candidates`` (``--knn-candidates``, l2/ip only): FAISS searches this many
    and the k nearest by exact distance are kept; None or k is the plain search.
    """

    def __init__(self, datastore: Datastore, index, index_meta: dict, k: int, sim_func: str,
                 candidates: Optional[int] = None):
        metric = index_meta.get("metric", "l2")
        if sim_func in ("l2", "ip") and sim_func != metric:
            raise RetrievalConfigError(
                f"--knn-sim-func {sim_func} needs an index built with --metric {sim_func}, "
                f"but {index_meta.get('path', 'the index')} uses {metric}; rebuild the index "
                f"or use --knn-sim-func faiss"
            )
        if index.ntotal > datastore.size:  # ids past the store would reach FAISS's unchecked kernels
            raise RetrievalConfigError(
                f"the index holds {index.ntotal} keys but the datastore has {datastore.size} "
                f"entries; rebuild the index for this datastore"
            )
        self.datastore = datastore
        self.index = index
        self.metric = metric
        self.k = k
        self.sim_func = sim_func
        # --knn-candidates: FAISS returns this many, re-ranked by exact distance to k
        self.candidates = k if candidates is None else int(candidates)
        self.nprobe = index_meta.get("nprobe")  # IVF lists probed per search (None without an IVF)
        self.queries_searched = 0  # FAISS queries made, for the end-of-run report

    def search(self, queries: torch.Tensor) -> Neighbours:
        """queries (n, dim) -> their k nearest entries: dists (n, k) float32, vals (n, k)
        int64 and the counts of a pruned store (n, k) int32 (None otherwise) on queries'
        device, datastore ids (n, k) int64 numpy.

        Slots FAISS could not fill (id -1) get distance +inf, value -1 and count 1,
        so they carry no weight and match no token.  A pruned store's entries weigh
        count * exp(-d / T).
        """
        device = queries.device
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        self.queries_searched += len(q)
        scores, ids, exact = self._index_search(q)
        if ids.size and ids.max() >= self.datastore.size:  # a damaged index: never index past the store
            raise RetrievalConfigError(
                f"the index returned neighbour id {int(ids.max())} but the datastore has "
                f"{self.datastore.size} entries: the index file is damaged; rebuild it"
            )
        safe_ids = np.where(ids < 0, 0, ids)
        vals = self.datastore.vals[safe_ids.reshape(-1)].reshape(ids.shape)
        if self.sim_func == "faiss":
            dists = faiss_distances(scores, self.metric)
        elif exact is not None:
            dists = exact  # already recomputed to re-rank the candidates
        else:
            dists = self._recompute(q, safe_ids)
        counts = self.datastore.counts
        counts = None if counts is None else counts[safe_ids.reshape(-1)].reshape(ids.shape)
        return search_neighbours(ids, vals, dists, counts, device)

    def _index_search(self, q: np.ndarray):
        """(scores, ids, exact distances or None) of the k nearest of each query.

        Without --knn-candidates, FAISS's k results as they are.  With N > k
        candidates, the k of FAISS's N nearest by exact distance, in a stable
        order (exact distance, then FAISS's rank); unfilled slots sort last.
        """
        if self.candidates == self.k:
            scores, ids = self.index.search(q, self.k)
            return scores, ids, None
        scores, ids = self.index.search(q, self.candidates)
        missing = ids < 0
        exact = self._recompute(q, np.where(missing, 0, ids)).numpy()
        order = np.argsort(np.where(missing, np.inf, exact), axis=1, kind="stable")[:, : self.k]

        def pick(a):
            return np.ascontiguousarray(np.take_along_axis(a, order, axis=1))

        return pick(scores), pick(ids), torch.from_numpy(pick(exact))

    def entry_distances(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact --knn-sim-func l2/ip distances from queries (n, dim) to the entries ids (n, w) >= 0."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return self._recompute(q, np.ascontiguousarray(ids, dtype=np.int64)).numpy()

    def _recompute(self, queries: np.ndarray, ids: np.ndarray) -> torch.Tensor:
        """Exact distances from the stored keys, by FAISS's by-index kernels.

        float32 keys in one array are read in place (a memory map: no gathered
        copy); float16 or sharded keys are gathered in chunks of GATHER_FLOATS
        and converted first.
        """
        keys = self.datastore.keys
        kernel = faiss.fvec_L2sqr_by_idx if self.sim_func == "l2" else faiss.fvec_inner_products_by_idx
        out = np.empty(ids.shape, dtype=np.float32)
        if isinstance(keys, np.ndarray) and keys.dtype == np.float32 and keys.flags.c_contiguous:
            _by_idx(kernel, out, queries, keys, ids)
        else:
            k = ids.shape[1]
            rows = max(1, GATHER_FLOATS // (k * self.datastore.dim))
            local = np.arange(rows * k, dtype=np.int64).reshape(rows, k)
            for s in range(0, len(ids), rows):
                chunk = ids[s : s + rows]
                gathered = np.ascontiguousarray(keys[chunk.reshape(-1)], dtype=np.float32)
                _by_idx(kernel, out[s : s + rows], queries[s : s + rows], gathered, local[: len(chunk)])
        dists = torch.from_numpy(out)
        return dists if self.sim_func == "l2" else -dists


def _by_idx(kernel, out, queries, keys, ids):
    """out[i, j] = kernel(queries[i], keys[ids[i, j]]); all C-contiguous, ids int64."""
    kernel(
        faiss.swig_ptr(out), faiss.swig_ptr(queries), faiss.swig_ptr(keys), faiss.swig_ptr(ids),
        keys.shape[1], ids.shape[0], ids.shape[1],
    )
