"""Analyses at one setting: perplexity by target frequency, where kNN helps and hurts."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .perplexity import mean_perplexity


def token_counts(token_ids, vocab_size: int = 0, chunk: int = 1 << 24, weights=None) -> np.ndarray:
    """How often each token id occurs (e.g. a datastore's vals), streamed in chunks.

    ``weights``: per-position multiplicities (a pruned datastore's counts)."""
    counts = np.zeros(max(vocab_size, 0), dtype=np.int64)
    for s in range(0, len(token_ids), chunk):
        part = np.asarray(token_ids[s : s + chunk]).astype(np.int64, copy=False)
        w = None if weights is None else np.asarray(weights[s : s + chunk])[part >= 0]
        part = part[part >= 0]
        c = np.bincount(part, weights=w, minlength=len(counts)).astype(np.int64)
        if len(c) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(c) - len(counts), dtype=np.int64)])
        counts[: len(c)] += c
    return counts


def default_frequency_edges(max_count: int) -> List[int]:
    """Bucket lower bounds 0, 1, 10, 100, ... up to the largest count."""
    edges, e = [0, 1], 10
    while e <= max_count:
        edges.append(e)
        e *= 10
    return edges


@dataclass
class BucketRow:
    label: str
    tokens: int
    base_ppl: float
    knn_ppl: float
    knn_skipped: int


def frequency_buckets(targets: np.ndarray, lm: np.ndarray, final: np.ndarray, counts: np.ndarray,
                      edges: Optional[Sequence[int]] = None) -> List[BucketRow]:
    """Base-LM vs kNN-LM perplexity by how often the target occurs in ``counts``.

    Bucket i holds targets with edges[i] <= count < edges[i+1]; the last is open.
    Perplexities are exp(mean NLL) in float64 over the bucket's tokens.
    """
    targets = np.asarray(targets, dtype=np.int64)
    freq = np.zeros(len(targets), dtype=np.int64)
    known = (targets >= 0) & (targets < len(counts))
    freq[known] = counts[targets[known]]
    edges = list(edges) if edges is not None else default_frequency_edges(int(freq.max(initial=0)))
    bucket = np.searchsorted(np.asarray(edges), freq, side="right") - 1
    rows = []
    for i, lo in enumerate(edges):
        sel = bucket == i
        if i + 1 < len(edges):
            hi = edges[i + 1]
            label = f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}"
        else:
            label = f">={lo}"
        if not sel.any():
            rows.append(BucketRow(label, 0, float("nan"), float("nan"), 0))
            continue
        base_ppl, _, _ = mean_perplexity(lm[sel])
        knn_ppl, _, skipped = mean_perplexity(final[sel])
        rows.append(BucketRow(label, int(sel.sum()), base_ppl, knn_ppl, skipped))
    return rows


def biggest_changes(lm: np.ndarray, final: np.ndarray, top: int) -> Tuple[np.ndarray, np.ndarray]:
    """Positions where kNN-LM raised (helps) and lowered (hurts) log p(target) most."""
    delta = np.asarray(final, dtype=np.float64) - np.asarray(lm, dtype=np.float64)
    order = np.argsort(delta, kind="stable")
    top = min(top, len(delta))
    return order[::-1][:top], order[:top]


def type_changes(targets: np.ndarray, lm: np.ndarray, final: np.ndarray, top: int):
    """Token types whose summed change in log-prob is largest (helps) and smallest (hurts).

    Returns two lists of (token id, occurrences, summed change in nats).
    Tokens whose kNN-LM score is -inf are left out.
    """
    targets = np.asarray(targets, dtype=np.int64)
    delta = np.asarray(final, dtype=np.float64) - np.asarray(lm, dtype=np.float64)
    ok = np.isfinite(delta) & (targets >= 0)
    size = int(targets[ok].max(initial=-1)) + 1
    total = np.bincount(targets[ok], weights=delta[ok], minlength=size)
    occ = np.bincount(targets[ok], minlength=size)
    ids = np.nonzero(occ)[0]
    order = ids[np.argsort(total[ids], kind="stable")]
    top = min(top, len(order))
    rows = lambda sel: [(int(i), int(occ[i]), float(total[i])) for i in sel]  # noqa: E731
    return rows(order[::-1][:top]), rows(order[:top])
