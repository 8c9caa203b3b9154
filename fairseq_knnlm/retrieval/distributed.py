"""--knn-distributed-index: the index pieces spread over the ranks of fairseq's distributed launch.

Rank r of W holds the index pieces {i : i % W == r} of a directory built by
``fairseq-knnlm-build-index --trained ... --shard-id I --num-shards N``; their
ids are datastore positions, so every rank reads values (and, for
``--knn-sim-func l2``/``ip``, keys) through the usual memory-mapped
:class:`~fairseq_knnlm.datastore.Datastore`, touching only its own rows.

Every ``search`` is one *round*, and all ranks take part in every round, in
the same order, from one thread at a time (the caller's, or ``--knn-overlap``'s
worker):

1. ``all_gather`` of (number of queries, done) from every rank; when every
   rank is done, the rounds end;
2. ``all_to_all``: every rank receives every rank's queries (counts differ,
   zero included);
3. every rank searches each rank's block of queries in its pieces, block by
   block, and gathers, for each candidate, FAISS's score, its datastore
   position, value, exact distance (``l2``/``ip``) and count (pruned stores)
   from its own rows;
4. ``all_to_all``: each rank receives its own queries' candidates from every
   rank and merges them (:func:`merge_candidates`).

A rank that has run out of batches calls :meth:`DistributedRetriever.serve_until_done`,
which answers rounds with zero queries of its own until every rank is done.

Exactness: a piece's results are its k best by FAISS's score, ordered by
(score, position) (FAISS's heaps break ties by id); the merge keeps the k
best of all pieces in that order, which is what ``faiss.IndexShards`` over
all pieces in one process (``--knn-index IDX/`` without this flag) returns.
FAISS's scores of a query depend, in the last bits, on the batch it is
searched in and on FAISS's thread count (its matrix products), so each
rank's queries are searched as the batch that rank would have searched
alone; with the same thread count, the scores are bit for bit those of one
process.  ``--knn-candidates N`` merges the N best by FAISS's score, then
re-ranks them by exact distance as :class:`~fairseq_knnlm.retriever.KNNRetriever` does.
"""

import contextlib
import logging
import os
from typing import List, Optional, Sequence

import faiss
import numpy as np
import torch

from ..errors import UserError
from .base import Neighbours, Retriever, faiss_distances, search_neighbours
from .retriever import KNNRetriever

logger = logging.getLogger(__name__)


class DistributedSearchError(UserError):
    pass


# ---------------------------------------------------------------- pure logic


def pieces_of_rank(num_pieces: int, rank: int, world_size: int) -> List[int]:
    """The index pieces rank ``rank`` of ``world_size`` holds: {i : i % world_size == rank}."""
    return list(range(rank, num_pieces, world_size))


def merge_order(scores: np.ndarray, ids: np.ndarray, metric: str, k: int) -> np.ndarray:
    """(n, k) columns of the k best candidates of each row of (n, C) scores and ids.

    FAISS's order: ascending squared L2 (``metric`` l2) or descending inner
    product (ip), ties by datastore position in the same direction (lower
    first for l2, higher first for ip, as FAISS's heaps and IndexShards give
    them); unfilled slots (id -1) last.
    """
    if metric == "l2":
        primary, secondary = scores, ids
    else:
        primary, secondary = -scores, -ids
    return np.lexsort((secondary, primary, ids < 0), axis=-1)[:, :k]


def rerank_order(exact: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """(n, k) columns of the k nearest by exact distance, ties in the given (FAISS's)
    order, unfilled slots last: KNNRetriever's --knn-candidates re-ranking."""
    return np.argsort(np.where(ids < 0, np.inf, exact), axis=1, kind="stable")[:, :k]


def merge_candidates(parts: np.ndarray, metric: str, candidates: int, k: int) -> np.ndarray:
    """(n, k) candidate records: the ``candidates`` best of each row of ``parts``
    (n, C) by FAISS's score (:func:`merge_order`), then, when fewer (k) are
    kept, the k nearest of those by exact distance (:func:`rerank_order`)."""
    top = np.take_along_axis(parts, merge_order(parts["score"], parts["id"], metric, candidates), axis=1)
    if k < candidates:
        top = np.take_along_axis(top, rerank_order(top["exact"], top["id"], k), axis=1)
    return top


def record_dtype(exact: bool, counts: bool) -> np.dtype:
    """One candidate as it travels between ranks (packed; every field a multiple of 4 bytes)."""
    fields = [("id", "<i8"), ("score", "<f4"), ("val", "<i4")]
    if exact:
        fields.append(("exact", "<f4"))
    if counts:
        fields.append(("count", "<i4"))
    return np.dtype(fields)


# ---------------------------------------------------------------- start-up


def check_process_group() -> None:
    """Refuse, in one line, a --knn-distributed-index run without ranks to spread the index over."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedSearchError(
            "--knn-distributed-index needs fairseq's distributed launch (e.g. torchrun --nproc_per_node N "
            "fairseq-eval-lm ... --distributed-world-size N --distributed-no-spawn --distributed-init-method "
            "env:// --distributed-rank $RANK); this process has no process group"
        )
    if dist.get_world_size() < 2:
        raise DistributedSearchError(
            "--knn-distributed-index needs at least 2 ranks, this run has 1; drop it to search the index here"
        )


def open_distributed_retriever(args, datastore, index_path: str) -> "DistributedRetriever":
    """This rank's pieces of the directory ``index_path``, as a DistributedRetriever."""
    import torch.distributed as dist

    from ..index.load import open_index
    from ..index.shards import find_shards

    check_process_group()
    if not os.path.isdir(str(index_path)):
        raise DistributedSearchError(
            f"--knn-distributed-index needs --knn-index to be a directory of index pieces "
            f"(fairseq-knnlm-build-index --trained IDX/trained.index --shard-id I --num-shards N), "
            f"not {index_path}"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    _, metas = find_shards(index_path)
    if len(metas) < world:
        raise DistributedSearchError(
            f"{index_path} holds {len(metas)} index pieces for {world} ranks: every rank needs one; "
            f"build at least {world} pieces (--num-shards {world}) or run fewer ranks"
        )
    mine = pieces_of_rank(len(metas), rank, world)
    index, meta = open_index(
        index_path, datastore, nprobe=args.probe, gpu=False, faiss_params=args.knn_faiss_params,
        mmap=args.knn_index_mmap, shard_ids=mine,
    )
    if args.knn_gpu:
        index = on_this_gpu(index)
    local = KNNRetriever(datastore, index, meta, args.k, args.knn_sim_func, candidates=args.knn_candidates)
    own_row = min(int(metas[mine[0]]["first_id"]), datastore.size - 1)
    logger.info(f"--knn-distributed-index: rank {rank} of {world} holds index pieces {mine} of "
                f"{len(metas)} ({meta['local_ntotal']:,} of {datastore.size:,} keys)")
    return DistributedRetriever(local, own_row=own_row)


def on_this_gpu(index: faiss.Index) -> faiss.Index:
    """``index`` (or each piece of an IndexShards) copied to this rank's GPU,
    torch.cuda.current_device(): one GPU per rank, as fairseq assigns them."""
    from ..index.gpu import check_gpu, to_gpus

    check_gpu()
    device = torch.cuda.current_device()
    if not isinstance(index, faiss.IndexShards):
        return to_gpus(index, devices=[device])
    parts = [to_gpus(faiss.downcast_index(index.at(i)), devices=[device]) for i in range(index.count())]
    shards = faiss.IndexShards(index.d, True, False)  # ids are datastore positions already
    for part in parts:
        shards.add_shard(part)
    shards.referenced_objects = parts
    return shards


# ---------------------------------------------------------------- the retriever


class DistributedRetriever(Retriever):
    """:class:`KNNRetriever`'s ``search`` over the pieces of all ranks.

    ``local`` searches this rank's pieces (its ``index``; ``datastore`` is the
    whole store, of which this rank reads only its own rows; ``own_row`` is
    one of them, read in place of unfilled slots).  ``group``: the process
    group (default: the whole world).  Collective tensors live on this
    rank's GPU under NCCL (the device current at construction) and on the
    CPU otherwise.
    """

    def __init__(self, local: KNNRetriever, own_row: int = 0, group=None):
        import torch.distributed as dist

        self.dist = dist
        self.local = local
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        nccl = "nccl" in str(dist.get_backend(group))
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.own_row = int(own_row)
        self.record = record_dtype(exact=local.sim_func != "faiss", counts=local.datastore.counts is not None)
        self.queries_searched = 0  # this rank's own queries, for the end-of-run report
        self.queries_served = 0  # other ranks' queries searched in this rank's pieces
        self.rounds = 0
        self.finished = False

    # KNNRetriever's attributes, for the scorer and the saved neighbours' metadata
    @property
    def datastore(self):
        return self.local.datastore

    @property
    def k(self) -> int:
        return self.local.k

    @property
    def candidates(self) -> int:
        return self.local.candidates

    @property
    def sim_func(self) -> str:
        return self.local.sim_func

    @property
    def metric(self) -> str:
        return self.local.metric

    @property
    def nprobe(self):
        return self.local.nprobe

    def search(self, queries: torch.Tensor) -> Neighbours:
        """As :meth:`KNNRetriever.search`, over the whole store; every rank must call
        ``search`` or :meth:`serve_until_done` for the round to complete."""
        if self.finished:
            raise RuntimeError("search after serve_until_done: the other ranks no longer answer")
        device = queries.device
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        self.queries_searched += len(q)
        top = self._round(q, done=False)
        return self._results(top, device)

    def serve_until_done(self) -> None:
        """Answer the other ranks' rounds, with no queries of its own, until every rank is done."""
        if self.finished:
            return
        own_rounds, served_before = self.rounds, self.queries_served
        empty = np.empty((0, self.datastore.dim), dtype=np.float32)
        while self._round(empty, done=True) is not None:
            pass
        self.finished = True
        logger.info(
            f"--knn-distributed-index: rank {self.rank} searched {self.queries_searched:,} queries of its own "
            f"in {own_rounds:,} rounds and {self.queries_served:,} of the other ranks' "
            f"({self.queries_served - served_before:,} after its own batches, in "
            f"{self.rounds - own_rounds:,} more rounds)"
        )

    # ------------------------------------------------------------ one round
    def _round(self, q: np.ndarray, done: bool) -> Optional[np.ndarray]:
        """(n, k) merged candidate records of this rank's queries q (n, dim), or None
        once every rank is done."""
        world, dim = self.world_size, q.shape[1]
        header = self._all_gather(torch.tensor([len(q), int(done)], dtype=torch.int64)).view(world, 2)
        if bool(header[:, 1].all()):
            return None
        self.rounds += 1
        counts = header[:, 0].tolist()
        n, total, width = len(q), sum(counts), self.local.candidates
        if total == 0:
            return np.zeros((0, self.k), dtype=self.record)
        everyone = self._all_to_all(
            torch.from_numpy(np.tile(q, (world, 1))).view(-1), [n * dim] * world, [c * dim for c in counts]
        ).numpy().reshape(total, dim)
        self.queries_served += total - n
        records = self._local_candidates(everyone, counts)
        words = self.record.itemsize // 4 * width  # int32 words per query
        received = self._all_to_all(
            torch.from_numpy(records.view(np.int32).reshape(-1)), [c * words for c in counts], [n * words] * world
        ).numpy().view(self.record).reshape(world, n, width)
        parts = np.ascontiguousarray(received.transpose(1, 0, 2)).reshape(n, world * width)
        return merge_candidates(parts, self.metric, width, self.k)

    def _local_candidates(self, q: np.ndarray, counts: Sequence[int]) -> np.ndarray:
        """(T, candidates) records of queries q (counts[s] of rank s, in rank order) in this
        rank's pieces, from its own rows."""
        # one FAISS call per rank's block: a query's scores depend on the batch it is searched in
        bounds = np.cumsum([0] + list(counts))
        found = [self.local.index.search(q[a:b], self.local.candidates)
                 for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        scores, ids = (np.concatenate(arrays) for arrays in zip(*found))
        missing = ids < 0
        safe = np.where(missing, self.own_row, ids)
        records = np.empty(ids.shape, dtype=self.record)
        records["id"], records["score"] = ids, scores
        records["val"] = np.where(missing, -1, self.datastore.vals[safe.reshape(-1)].reshape(ids.shape))
        if "exact" in self.record.names:
            records["exact"] = self.local.entry_distances(q, safe)
        if "count" in self.record.names:
            records["count"] = np.where(missing, 1, self.datastore.counts[safe.reshape(-1)].reshape(ids.shape))
        return records

    def _results(self, top: np.ndarray, device) -> Neighbours:
        """KNNRetriever.search's Neighbours from merged records."""
        dists = faiss_distances(top["score"], self.metric) if self.sim_func == "faiss" else top["exact"]
        counts = top["count"] if "count" in self.record.names else None
        return search_neighbours(np.ascontiguousarray(top["id"]), top["val"], dists, counts, device)

    # ------------------------------------------------------------ collectives
    def _on_device(self):
        # the current CUDA device is per thread: --knn-overlap's worker must name it
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        with self._on_device():
            tensor = tensor.to(self.device)
            out = [torch.empty_like(tensor) for _ in range(self.world_size)]
            self.dist.all_gather(out, tensor, group=self.group)
            return torch.cat(out).cpu()

    def _all_to_all(self, send: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int]) -> torch.Tensor:
        with self._on_device():
            out = torch.empty(sum(recv_splits), dtype=send.dtype, device=self.device)
            self.dist.all_to_all_single(out, send.to(self.device), list(recv_splits), list(send_splits),
                                        group=self.group)
            return out.cpu()
