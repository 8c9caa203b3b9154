"""Nearest-neighbour retrieval: queries in, (distances, values) of the k nearest keys out."""

import numpy as np

from .errors import UserError
import torch

from .datastore import Datastore
from .knn_math import ip_dists, l2_dists


# Neighbour-key floats read at once when recomputing distances (256 MiB).
RECOMPUTE_FLOATS = 1 << 26


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
        """Exact distances from the stored keys, in chunks of about
        RECOMPUTE_FLOATS neighbour-key floats to bound memory."""
        dist_fn = l2_dists if self.sim_func == "l2" else ip_dists
        rows = max(1, RECOMPUTE_FLOATS // (ids.shape[1] * self.datastore.dim))
        out = []
        for s in range(0, len(ids), rows):
            chunk = ids[s : s + rows]
            keys = np.asarray(self.datastore.keys[chunk.reshape(-1)], dtype=np.float32)
            keys = torch.from_numpy(keys).view(chunk.shape + (-1,))
            out.append(dist_fn(torch.from_numpy(queries[s : s + rows]), keys))
        return torch.cat(out)
