"""Pointers between consecutive datastore entries (RetoMaton, Alon et al., ICML 2022).

Entry ``i`` of a datastore is (context before a corpus token, that token) and
entry ``i + 1`` the context that ends with it.  So after a token has been
scored, the neighbours whose value is the token that was actually observed
point, through ``i + 1``, at contexts like the next one: they are the next
token's *candidates*.  ``--knn-pointers`` scores the next token with them
instead of searching, as long as at least ``--knn-pointer-min-candidates`` of
them remain; with fewer it searches, and the chain starts again from the
search results.

Exactness: the candidates' distances are those ``--knn-sim-func`` defines for
the same entries (``l2``/``ip``: exact, from the stored keys; ``faiss``: the
index's own distance to its reconstruction of the entry), and a threshold
above k never follows a pointer: every token is searched, as without pointers.
A pointer never crosses the end of a datastore shard or of the store.

The decisions depend only on neighbour ids, values and observed tokens, never
on λ or the temperature.
"""

import logging
from typing import Callable, Optional, Tuple

import faiss
import numpy as np
import torch

from ..errors import UserError
from .base import Batch, NeighbourSource, Neighbours, Selection

logger = logging.getLogger(__name__)

# Stored keys whose search and reconstruction distances are compared at start-up.
CHECK_QUERIES = 8
CHECK_K = 8
# Fast-scan PQ searches with 8-bit look-up tables, so its distances differ from
# those to its reconstruction by ~1%; a different distance (Hamming, ...) by far more.
CHECK_RTOL = 0.05


class PointerError(UserError):
    pass


# ---------------------------------------------------------------- pure logic


def last_entries(shard_sizes) -> np.ndarray:
    """Ids of the last entry of every shard (sorted): they have no successor."""
    ends = np.cumsum(np.asarray(shard_sizes, dtype=np.int64))
    return ends[ends > np.concatenate([[0], ends[:-1]])] - 1


def follow(ids: np.ndarray, vals: np.ndarray, observed: np.ndarray, ends: np.ndarray, k: int) -> np.ndarray:
    """The next token's candidates: (m, k) int64 entry ids, -1 padded at the right.

    ids, vals (m, w): the entries that scored each row's token (-1: none), in
    rank order; observed (m,): the token that was observed.  A row's candidates
    are ``i + 1`` for its entries ``i`` whose value is the observed token and
    which are not the last entry of a shard (``ends``), without repeats, in
    the order of their entries, at most ``k``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    keep = (ids >= 0) & (np.asarray(vals) == np.asarray(observed).reshape(-1, 1))
    keep &= ~np.isin(ids, ends)
    succ = np.where(keep, ids + 1, -1)
    if succ.shape[1] > 1:
        # Repeats: mark every occurrence after the first (in rank order).
        order = np.argsort(succ, axis=1, kind="stable")
        ranked = np.take_along_axis(succ, order, axis=1)
        repeat = np.zeros_like(keep)
        repeat[:, 1:] = (ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)
        dup = np.zeros_like(keep)
        np.put_along_axis(dup, order, repeat, axis=1)
        succ[dup] = -1
    # Compact to the left, keeping the order.
    order = np.argsort(succ < 0, axis=1, kind="stable")
    succ = np.take_along_axis(succ, order, axis=1)[:, :k]
    if succ.shape[1] < k:
        succ = np.pad(succ, ((0, 0), (0, k - succ.shape[1])), constant_values=-1)
    return succ


def rank_candidates(dists: np.ndarray, ids: np.ndarray, vals: np.ndarray):
    """Sort each row's candidates by distance (ties: candidate order), like search results."""
    order = np.argsort(dists, axis=1, kind="stable")
    return tuple(np.take_along_axis(a, order, axis=1) for a in (dists, ids, vals))


# A search: queries (n, dim) -> (dists (n, k) float32, vals (n, k) int64, ids (n, k) int64), numpy.
Search = Callable[[torch.Tensor], Tuple[np.ndarray, np.ndarray, np.ndarray]]
# Candidate distances: (queries (n, dim) float32, ids (n, w) int64 >= 0) -> (n, w) float32.
EntryDistances = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Pointers:
    """Scores tokens from pointers where enough candidates remain, by search otherwise.

    ``search`` and ``entry_dists`` give the distances ``--knn-sim-func``
    defines; ``store_vals`` are the datastore's values, ``ends`` its shards'
    last entries (:func:`last_entries`).  ``tokens`` and ``searched`` count
    every token decided and every token searched.
    """

    def __init__(self, search: Search, entry_dists: EntryDistances, store_vals, ends, k: int, min_candidates: int):
        self.search = search
        self.entry_dists = entry_dists
        self.store_vals = store_vals
        self.ends = np.asarray(ends, dtype=np.int64)
        self.k = int(k)
        self.min_candidates = int(min_candidates)
        self.tokens = 0
        self.searched = 0

    @property
    def never_followed(self) -> bool:
        """No token can ever have min_candidates candidates (at most k)."""
        return self.min_candidates > self.k

    def empty_state(self, rows: int) -> np.ndarray:
        return np.full((rows, self.k), -1, dtype=np.int64)

    def step(self, queries: torch.Tensor, state: np.ndarray, selected: Optional[np.ndarray] = None):
        """One token of each of m rows: (dists, vals, ids), each (m, k) numpy.

        ``state`` (m, k): each row's candidates (:func:`follow`).  Rows with at
        least ``min_candidates`` are scored with them, sorted by distance and
        padded with (+inf, -1, -1); the others are searched, in one call.
        Rows not ``selected`` are neither: they get no neighbours.
        """
        m = len(state)
        dists = np.full((m, self.k), np.inf, dtype=np.float32)
        vals = np.full((m, self.k), -1, dtype=np.int64)
        ids = np.full((m, self.k), -1, dtype=np.int64)
        selected = np.ones(m, dtype=bool) if selected is None else np.asarray(selected, dtype=bool)
        known = state >= 0
        enough = (known.sum(axis=1) >= self.min_candidates) & selected
        need = ~enough & selected
        if need.any():
            rows = np.nonzero(need)[0]
            dists[rows], vals[rows], ids[rows] = self.search(queries[torch.from_numpy(rows).to(queries.device)])
            self.searched += len(rows)
        if enough.any():
            rows = np.nonzero(enough)[0]
            cand, valid = state[rows], known[rows]
            q = np.ascontiguousarray(queries[torch.from_numpy(rows).to(queries.device)].detach().float().cpu().numpy())
            d = self.entry_dists(q, np.where(valid, cand, 0)).astype(np.float32)
            d[~valid] = np.inf
            v = np.where(valid, self.store_vals[np.where(valid, cand, 0)], -1).astype(np.int64)
            dists[rows], ids[rows], vals[rows] = rank_candidates(d, cand, v)
        self.tokens += int(selected.sum())
        return dists, vals, ids

    def score_rows(self, queries: torch.Tensor, targets: torch.Tensor, row_lengths, selected=None):
        """Neighbours of n scored tokens laid out row after row (eval-lm's order).

        row_lengths (rows,): scored tokens per row, which follow each other in
        ``queries``/``targets``.  A row's state starts empty; its tokens are
        taken in order, the j-th tokens of all rows together (one search call).
        ``selected`` (n,) bool: tokens to score at all; an unselected token
        leaves no candidates, so the row's next token is searched.
        Returns their Neighbours: dists (n, k) float32 and vals (n, k) int64 on
        queries' device, datastore ids (n, k) int64 numpy.
        """
        device = queries.device
        n = int(targets.numel())
        sel = None if selected is None else np.asarray(torch.as_tensor(selected).cpu(), dtype=bool)
        if self.never_followed:
            rows = np.arange(n) if sel is None else np.nonzero(sel)[0]
            dists = np.full((n, self.k), np.inf, dtype=np.float32)
            vals = np.full((n, self.k), -1, dtype=np.int64)
            ids = np.full((n, self.k), -1, dtype=np.int64)
            if len(rows) == n:  # the plain path: one search call
                dists, vals, ids = self.search(queries)
            elif len(rows):
                dists[rows], vals[rows], ids[rows] = self.search(queries[torch.from_numpy(rows).to(device)])
            self.tokens += len(rows)
            self.searched += len(rows)
            return Neighbours(torch.from_numpy(dists).to(device), torch.from_numpy(vals).to(device), None, ids)
        lengths = np.asarray(torch.as_tensor(row_lengths).cpu(), dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        tgt = np.asarray(targets.cpu(), dtype=np.int64)
        dists = np.empty((n, self.k), dtype=np.float32)
        vals = np.empty((n, self.k), dtype=np.int64)
        ids = np.empty((n, self.k), dtype=np.int64)
        state = self.empty_state(len(lengths))
        for j in range(int(lengths.max(initial=0))):
            rows = np.nonzero(lengths > j)[0]
            pos = starts[rows] + j
            pick = None if sel is None else sel[pos]
            d, v, i = self.step(queries[torch.from_numpy(pos).to(device)], state[rows], pick)
            dists[pos], vals[pos], ids[pos] = d, v, i
            state[rows] = follow(i, v, tgt[pos], self.ends, self.k)
        return Neighbours(torch.from_numpy(dists).to(device), torch.from_numpy(vals).to(device), None, ids)

    def report(self) -> str:
        """The end-of-run line: how many of the decided tokens were searched."""
        saved = 1 - self.searched / self.tokens if self.tokens else 0.0
        return (f"kNN pointers: searched {self.searched:,} of {self.tokens:,} tokens; "
                f"{saved:.2%} of searches saved (min candidates {self.min_candidates})")


class PointerNeighbours(NeighbourSource):
    """--knn-pointers as the pipeline's neighbour source: a batch's sequences are
    followed token after token (:meth:`Pointers.score_rows`), so it needs the
    scored targets and row lengths of eval-lm's batches.  The neighbours given are
    the ones used: pointer candidates sorted by distance, padded (+inf, -1)."""

    def __init__(self, pointers: Pointers):
        self.pointers = pointers

    def neighbours(self, batch: Batch, selection: Optional[Selection]) -> Neighbours:
        mask = None if selection is None else selection.mask
        found = self.pointers.score_rows(batch.queries, batch.targets, batch.row_lengths, mask)
        return found if selection is None else found.take(selection)


# ------------------------------------------------------------ FAISS and flags


def check_datastore(datastore) -> None:
    """Pointers need entries in corpus order: a pruned store has merged them."""
    if datastore.meta.get("pruned") or getattr(datastore, "counts", None) is not None:
        raise PointerError(
            f"--knn-pointers follows consecutive entries, but {datastore.path} is pruned (its entries "
            "were merged); use the unpruned datastore")


def _transformed_queries(index):
    """(the index below its pre-transforms, a function mapping queries into its space)."""
    chain = []
    while isinstance(index, faiss.IndexPreTransform):
        chain += [index.chain.at(i) for i in range(index.chain.size())]
        index = faiss.downcast_index(index.index)

    def transform(x: np.ndarray) -> np.ndarray:
        for vt in chain:
            x = vt.apply(x)
        return np.ascontiguousarray(x, dtype=np.float32)

    return index, transform


def index_distances(index, metric: str, index_path: str = "the index") -> EntryDistances:
    """The index's own distance from queries to given entries, for --knn-sim-func faiss.

    That is the distance to the index's reconstruction of the entry (squared
    L2, or negated inner product), in the space below its pre-transforms: what
    its search approximates (equal up to rounding for Flat, IVF-Flat and PQ
    codes).  IVF indexes get a direct map (8 bytes per entry) so entries can be
    reconstructed; fast-scan IVF indexes are refused (FAISS crashes
    reconstructing their entries once they are read from disk).
    """
    inner, transform = _transformed_queries(index)
    if isinstance(faiss.downcast_index(inner), faiss.IndexShards):
        raise PointerError(
            f"--knn-pointers cannot give the candidates of {index_path} its own distances: index pieces "
            "searched in place cannot reconstruct entries; use --knn-sim-func l2, or merge the pieces "
            "(fairseq-knnlm-build-index --merge)"
        )
    try:
        ivf = faiss.extract_index_ivf(inner)
    except RuntimeError:
        ivf = None  # no IVF inside: Flat, HNSW, ... reconstruct by themselves
    if ivf is not None:
        if isinstance(faiss.downcast_index(inner), faiss.IndexIVFFastScan):
            # FAISS crashes (segfault) reconstructing the entries of a fast-scan IVF read from disk.
            raise PointerError(
                f"--knn-pointers cannot give the candidates of {index_path} its own distances: FAISS "
                "cannot reconstruct the entries of a fast-scan (x4fs) IVF index; use --knn-sim-func l2"
            )
        if ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()
    kernel = faiss.fvec_L2sqr_by_idx if metric == "l2" else faiss.fvec_inner_products_by_idx

    def distances(queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        q = transform(queries)
        flat = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
        try:
            recon = inner.reconstruct_batch(flat)
        except RuntimeError as e:
            raise PointerError(
                f"{index_path} cannot reconstruct its entries ({str(e).strip().splitlines()[-1]}), "
                "so --knn-pointers cannot give them its distances; use --knn-sim-func l2 or ip") from None
        out = np.empty(ids.shape, dtype=np.float32)
        local = np.arange(len(flat), dtype=np.int64).reshape(ids.shape)
        kernel(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(recon), faiss.swig_ptr(local),
               q.shape[1], ids.shape[0], ids.shape[1])
        return out if metric == "l2" else -out

    return distances


def check_index_distances(index, distances: EntryDistances, keys, metric: str, index_path: str) -> None:
    """Refuse an index whose reconstruction distances are not its search distances."""
    n = min(CHECK_QUERIES, len(keys))
    sample = np.linspace(0, len(keys) - 1, n).astype(np.int64)
    q = np.ascontiguousarray(keys[sample], dtype=np.float32) + np.float32(1e-3)
    scores, ids = index.search(q, min(CHECK_K, index.ntotal))
    searched = scores if metric == "l2" else -scores
    found = ids >= 0
    recon = distances(q, np.where(found, ids, 0))
    scale = np.abs(searched[found]).max(initial=0.0) + 1e-6
    gap = np.abs(recon[found] - searched[found]).max(initial=0.0) / scale
    if gap > CHECK_RTOL:
        raise PointerError(
            f"the distances of {index_path} to its own entries differ from its search distances "
            f"({gap:.1%}), so --knn-pointers cannot score candidates like it; use --knn-sim-func l2 or ip")


def build_pointers(args, datastore, retriever, index_path: str = "the index") -> Pointers:
    """The --knn-pointers machinery of a run, checked against its datastore and index."""
    check_datastore(datastore)
    if retriever.sim_func == "faiss":
        entry_dists = index_distances(retriever.index, retriever.metric, index_path)
        check_index_distances(retriever.index, entry_dists, datastore.keys, retriever.metric, index_path)
    else:
        entry_dists = retriever.entry_distances

    def search(queries):
        found = retriever.search(queries)
        return found.dists.cpu().numpy(), found.vals.cpu().numpy(), found.ids

    shard_sizes = [s.size for s in getattr(datastore, "shards", [])] or [datastore.size]
    pointers = Pointers(search, entry_dists, datastore.vals, last_entries(shard_sizes),
                        args.k, args.knn_pointer_min_candidates)
    if pointers.never_followed:
        logger.warning(f"--knn-pointer-min-candidates {pointers.min_candidates} exceeds --k {args.k}: "
                       "no token can have that many candidates, so every token is searched")
    return pointers
