"""Nearest-neighbour retrieval: queries in, (distances, values) of the k nearest keys out."""

import faiss
import numpy as np
import torch

from .datastore import Datastore
from .errors import UserError

# Neighbour-key floats gathered at once when the keys cannot be read in place
# (float16 or sharded stores): 16 MiB, small enough for malloc to reuse.
GATHER_FLOATS = 1 << 22


class RetrievalConfigError(UserError):
    pass


class KNNRetriever:
    """Searches a FAISS index over a datastore and returns kNN-LM distances.

    ``sim_func`` chooses the distances handed to the softmax:
    ``faiss`` the index's own (squared L2, or negated inner product for IP
    indexes; no key reads), ``l2`` exact squared L2 recomputed from the stored
    keys, ``ip`` exact negated inner products from the stored keys.
    """

    def __init__(self, datastore: Datastore, index, index_meta: dict, k: int, sim_func: str):
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

    def search(self, queries: torch.Tensor):
        """queries (n, dim) -> dists (n, k) float32, vals (n, k) int64, on queries' device.

        Slots FAISS could not fill (id -1) get distance +inf and value -1, so
        they carry no weight and match no token.
        """
        device = queries.device
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        scores, ids = self.index.search(q, self.k)
        missing = ids < 0
        safe_ids = np.where(missing, 0, ids)
        vals = self.datastore.vals[safe_ids.reshape(-1)].reshape(ids.shape).astype(np.int64)
        vals[missing] = -1
        if self.sim_func == "faiss":
            dists = torch.from_numpy(scores if self.metric == "l2" else -scores)
        else:
            dists = self._recompute(q, safe_ids)
        dists = dists.float().masked_fill(torch.from_numpy(missing), float("inf"))
        return dists.to(device), torch.from_numpy(vals).to(device)

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
