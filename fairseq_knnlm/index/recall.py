"""How well an index finds what exact search finds: recall@k against exact
search, and self-recall (stored keys finding their own position)."""

import sys
from typing import Dict, Optional

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth
from tqdm import tqdm

from .factory import METRICS, nprobe_of, set_nprobe
from .progress import call_with_clock
from .reader import KeyReader, sample_ids

# recall@1024: kNN-LM's k (only for stores of at least that many keys).
RECALL_KS = (1, 10, 100, 1024)
# Neighbour-key floats read at once while scoring --eval-recall's results.
RECALL_BLOCK_FLOATS = 1 << 22
# Rows per block of exact search for --eval-recall.
EXACT_SEARCH_BLOCK = 1 << 16


def exact_scores(queries: np.ndarray, keys: np.ndarray, metric: str) -> np.ndarray:
    """(n, k) exact L2 distances (lower is better) or inner products, in float64."""
    q = queries[:, None, :].astype(np.float64)
    if metric == "l2":
        return ((keys.astype(np.float64) - q) ** 2).sum(-1)
    return (keys.astype(np.float64) * q).sum(-1)


def evaluate_recall(index: faiss.Index, reader: KeyReader, n_queries: int, metric: str,
                    seed: int = 1, progress: bool = False, ks=RECALL_KS) -> Dict:
    """recall@k of ``index`` against exact search, stored keys as queries.

    recall@k is the fraction of the exact k nearest keys that the index
    returns in its top k.  A returned key tied with the exact k-th distance
    counts as found (stores can hold duplicate keys, whose order is arbitrary).
    """
    n = min(int(n_queries), reader.size)
    ks = [k for k in ks if k <= reader.size]
    kmax = max(ks)
    ids = np.random.default_rng([seed, 1]).choice(reader.size, n, replace=False)
    xq = reader.take(ids)
    blocks = (x for _, _, x in reader.chunks(EXACT_SEARCH_BLOCK))
    _, true_ids = call_with_clock(
        lambda: knn_ground_truth(xq, blocks, kmax, metric_type=METRICS[metric]),
        f"recall: exact search for {n} queries", progress)
    _, found_ids = index.search(xq, kmax)
    hits = {k: 0 for k in ks}
    better = np.less_equal if metric == "l2" else np.greater_equal
    rows = max(1, min(64, RECALL_BLOCK_FLOATS // (kmax * reader.dim)))  # bounded memory at k 1024
    for b in range(0, n, rows):
        q = xq[b : b + rows]
        t, f = true_ids[b : b + rows], found_ids[b : b + rows]
        true_s = exact_scores(q, reader.take(t.reshape(-1)).reshape(t.shape + (-1,)), metric)
        found_s = exact_scores(q, reader.take(np.maximum(f, 0).reshape(-1)).reshape(f.shape + (-1,)), metric)
        true_s = np.sort(true_s, axis=1) if metric == "l2" else -np.sort(-true_s, axis=1)
        for k in ks:
            kth = true_s[:, k - 1 : k]
            ok = better(found_s[:, :k], kth) & (f[:, :k] >= 0)
            hits[k] += int(ok.sum())
    return dict(queries=n, nprobe=nprobe_of(index),
                **{f"recall@{k}": round(hits[k] / (n * k), 4) for k in ks})


def format_recall(recall: Dict) -> str:
    values = " ".join(f"{k} {v:.4f}" for k, v in recall.items() if k.startswith("recall@"))
    probe = f", nprobe {recall['nprobe']}" if recall.get("nprobe") else ""
    return f"{values} ({recall['queries']} stored keys as queries{probe})"


def self_recall(index: faiss.Index, keys, queries: int = 1000, k: int = 1024,
                nprobe: Optional[int] = 32, seed: int = 1, progress: bool = False) -> Dict:
    """Stored keys searched in ``index``: the fraction that find their own
    position among their ``k`` nearest ids (``at_k``) and at rank 1 (``at_1``).

    An index over other keys, or whose ids are not the store's positions,
    scores near 0; an index of this store near 1 (only quantisation error can
    push a key below others).
    """
    reader = KeyReader(keys)
    n, k = min(int(queries), reader.size), min(int(k), reader.size)
    ids = sample_ids(reader.size, n, seed)
    xq = reader.take(ids)
    set_nprobe(index, nprobe)
    found = np.empty((n, k), np.int64)
    with tqdm(total=n, desc="self-recall", unit="queries", disable=not progress, file=sys.stderr) as bar:
        for b in range(0, n, 100):
            _, found[b : b + 100] = index.search(xq[b : b + 100], k)
            bar.update(min(100, n - b))
    hit = found == ids[:, None]
    return dict(queries=n, k=k, nprobe=nprobe_of(index),
                found=int(hit.any(1).sum()), at_k=round(float(hit.any(1).mean()), 4),
                at_1=round(float(hit[:, 0].mean()), 4), seed=int(seed))


def format_self_recall(recall: Dict) -> str:
    probe = f", nprobe {recall['nprobe']}" if recall.get("nprobe") else ""
    return (
        f"self-recall {recall['at_k']:.4f}: {recall['found']} of {recall['queries']} sampled stored keys "
        f"find themselves among their {recall['k']} nearest (at rank 1: {recall['at_1']:.4f}{probe})"
    )
