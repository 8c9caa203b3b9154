"""The kNN probability table: log p_kNN(target) for every (k, T) of a grid, in one
pass over saved neighbours, plus the test-time confidence signals of the retrieval."""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..scoring import knn_math
from .grid import check_grid
from .threads import run_in_chunks

# Below exp(-80) a neighbour's share of the softmax is < 2e-35 of the nearest
# one's: clamping there avoids float32's slow denormal path and changes no sum
# that matters; rows whose matched mass is below 1e-20 are redone in log space.
_EXP_FLOOR = -80.0
_EXACT_BELOW = 1e-20


def knn_target_log_probs_fast(dists: torch.Tensor, match: torch.Tensor, temperature: float,
                              work: Optional[torch.Tensor] = None, scratch: Optional[torch.Tensor] = None,
                              nearest: Optional[torch.Tensor] = None, shifted: Optional[torch.Tensor] = None,
                              has_match: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None):
    """log p_kNN(target) like :func:`knn_math.knn_target_log_probs`, one exp per neighbour.

    dists (n, k) float32; match (n, k) float32, 1 where the neighbour's value
    is the target.  With e = exp(-(d - min d) / T) it returns
    log(sum_match e) - log(sum e), the same number up to float32 rounding;
    rows whose matched mass underflows are finished in log space.
    ``nearest`` (n, 1) = min d, ``shifted`` = d - nearest and ``has_match``
    (n,) = any neighbour matches may be passed in (they do not depend on T);
    ``work``/``scratch`` are optional (n, k)
    buffers.  Returns ``(log_probs, top_weight, nn_dist, e)``: the largest
    single neighbour weight, the smallest distance, and the unnormalised
    weights (``work``'s storage when given).  ``counts`` (n, k): the neighbours'
    counts in a pruned datastore, each weight then being count * e.
    """
    if shifted is None:
        nearest = dists.amin(dim=1, keepdim=True)
        shifted = dists - nearest
    scale = -1.0 / temperature
    x = torch.mul(shifted, scale, out=work) if work is not None else shifted * scale
    x.clamp_(min=_EXP_FLOOR).exp_()
    if counts is not None:
        x.mul_(counts)
    total = x.sum(dim=1)
    masked = torch.mul(x, match, out=scratch) if scratch is not None else x * match
    matched = masked.sum(dim=1)
    if has_match is None:
        has_match = match.amax(dim=1) > 0
    redo = (matched < _EXACT_BELOW) & has_match
    out = matched.log_().sub_(total.log())
    nearest = nearest.squeeze(1)
    if redo.any():
        # log-sum-exp over the matched neighbours only, from the same shifted logits
        xr = shifted[redo] * scale
        if counts is not None:
            xr.add_(counts[redo].log())
        xr.masked_fill_(match[redo] == 0, -math.inf)
        peak = xr.amax(dim=1, keepdim=True)
        mass = xr.sub_(peak).clamp_(min=_EXP_FLOOR).exp_().mul_(match[redo]).sum(dim=1)
        out[redo] = peak.squeeze(1) + mass.log() - total[redo].log()
    empty = torch.isinf(nearest)  # no neighbour retrieved at all
    if empty.any():
        out[empty] = -math.inf
    top_weight = total.reciprocal() if counts is None else x.amax(dim=1) / total
    return out, top_weight, nearest, x


def value_groups(vals: torch.Tensor):
    """Per row, a group id for each neighbour (equal values share one) and whether it is
    the first neighbour with its value.  (n, k) -> (gid int64, first bool), both (n, k)."""
    sorted_vals, order = torch.sort(vals, dim=1, stable=True)
    starts = torch.ones_like(sorted_vals, dtype=torch.bool)
    starts[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    gid_sorted = starts.long().cumsum(dim=1) - 1
    gid = torch.empty_like(gid_sorted).scatter_(1, order, gid_sorted)
    first = torch.empty_like(starts).scatter_(1, order, starts)
    return gid, first


SIGNALS = ("nn_dist", "top_weight", "knn_max_prob", "distinct_vals")
SIGNAL_HELP = {
    "nn_dist": "distance to the nearest neighbour",
    "top_weight": "largest single neighbour weight",
    "knn_max_prob": "largest p_kNN over the vocabulary",
    "distinct_vals": "distinct next tokens among the k neighbours",
}


@dataclass
class KnnTable:
    """log p_kNN(target) for every (k, temperature) of a grid; signals if asked."""

    ks: List[int]
    temps: List[float]
    knn_log_probs: np.ndarray            # (len(ks), len(temps), n) float32
    signals: Dict[str, np.ndarray] = field(default_factory=dict)  # name -> (len(ks), len(temps), n)


def default_chunk_rows(k: int) -> int:
    return max(64, (1 << 21) // max(k, 1))



def _table_chunk(nb, s, e, ks, temps, kmax, signals, exact, out, sig):
    """Fill out[:, :, s:e] (and sig) from rows s:e; one thread, private buffers."""
    # np.array copies: the chunk must not alias the read-only memory map.
    d_all = torch.from_numpy(np.array(nb.dists[s:e][:, :kmax], dtype=np.float32))
    v_all = torch.from_numpy(np.array(nb.vals[s:e][:, :kmax], dtype=np.int32))
    t = torch.from_numpy(np.array(nb.targets[s:e], dtype=np.int32))
    # neighbour counts of a pruned datastore (None: each neighbour counts once)
    c_all = None if getattr(nb, "counts", None) is None else torch.from_numpy(
        np.array(nb.counts[s:e][:, :kmax], dtype=np.int32))
    match_all = (v_all == t.unsqueeze(1)).float()
    if signals:
        gid_all, first_all = value_groups(v_all)
    buffers = [torch.empty_like(d_all) for _ in range(3)]
    for ki, k in enumerate(ks):
        if k == kmax:
            d, v, match = d_all, v_all, match_all
        else:
            d, v, match = (a[:, :k].contiguous() for a in (d_all, v_all, match_all))
        c = None if c_all is None else c_all[:, :k].contiguous()
        # (rows, k) views of the per-chunk buffers; each is written before it is read
        work, scratch, shifted = (b.view(-1)[: d.numel()].view(d.shape) for b in buffers)
        if signals:
            distinct = first_all[:, :k].sum(dim=1).float().numpy()
            gid = gid_all[:, :k].contiguous()
        if signals or not exact:
            nearest = d.amin(dim=1, keepdim=True)
            torch.sub(d, nearest, out=shifted)
            has_match = match.amax(dim=1) > 0
        for ti, T in enumerate(temps):
            if exact:
                out[ki, ti, s:e] = knn_math.knn_target_log_probs(d, v, t, T, c).numpy()
            if signals or not exact:
                lp, top_w, nn_d, weights = knn_target_log_probs_fast(
                    d, match, T, work, scratch, nearest=nearest, shifted=shifted, has_match=has_match,
                    counts=None if c is None else c.float())
                if not exact:
                    out[ki, ti, s:e] = lp.numpy()
            if signals:
                grouped = weights.new_zeros(len(weights), kmax).scatter_add_(1, gid, weights)
                norm = top_w if c is None else weights.sum(dim=1).reciprocal()  # 1 / total weight
                sig["knn_max_prob"][ki, ti, s:e] = (grouped.amax(dim=1) * norm).numpy()
                sig["top_weight"][ki, ti, s:e] = top_w.numpy()
                sig["nn_dist"][ki, ti, s:e] = nn_d.numpy()
                sig["distinct_vals"][ki, ti, s:e] = distinct


def knn_table(nb, ks: Sequence[int], temps: Sequence[float], signals: bool = False,
              exact: bool = False, chunk_rows: Optional[int] = None, progress: bool = False,
              threads: Optional[int] = None) -> KnnTable:
    """Compute log p_kNN(target) for all (k, T) in one pass over the saved neighbours.

    ``nb`` is a :class:`~fairseq_knnlm.neighbors.Neighbors`.  Rows are read in
    chunks of ``chunk_rows`` (memory ~ 8 x chunk_rows x max(ks) x 4 bytes per
    thread); ``threads`` chunks are processed at once, each single-threaded.
    ``exact`` calls knn_math.knn_target_log_probs per (k, T), exactly as the
    scorer does (slower); otherwise the one-exp form is used (same values to
    float32 rounding).  ``signals`` also records the test-time confidence
    signals of :data:`SIGNALS` (none of them looks at the target).
    """
    ks, temps = [int(k) for k in ks], [float(t) for t in temps]
    kmax, n = max(ks), len(nb.targets)
    check_grid(ks, temps, [0.0], nb.k, nb.path)
    rows = int(chunk_rows or default_chunk_rows(kmax))
    out = np.empty((len(ks), len(temps), n), dtype=np.float32)
    sig = {name: np.empty((len(ks), len(temps), n), dtype=np.float32) for name in SIGNALS} if signals else {}
    spans = [(s, min(s + rows, n)) for s in range(0, n, rows)]
    job = lambda span: _table_chunk(nb, *span, ks, temps, kmax, signals, exact, out, sig)  # noqa: E731
    run_in_chunks(job, spans, threads, progress, desc="kNN probabilities")
    return KnnTable(ks, temps, out, sig)
