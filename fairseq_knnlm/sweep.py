"""Offline kNN-LM tuning on saved neighbours: pure functions on arrays.

The expensive part of a kNN-LM evaluation is the model and the search; both
are done once by ``fairseq-eval-lm --knnlm --knn-save-neighbors``.  Here the
kNN probability of every target is computed once per (k, temperature) in row
chunks, after which every λ costs one vectorised interpolation, and
perplexities are summed the way fairseq-eval-lm sums them.
"""

import contextlib
import math
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import knn_math
from .errors import UserError


class SweepError(UserError):
    """Settings or inputs the sweep cannot use; the message says what to do."""


# ------------------------------------------------------------------- grids
def parse_grid(text: str, option: str, cast=float) -> List:
    """``"0:1:0.05"`` (inclusive range), ``"1,2,5,10"`` or a mix (``"0,0.1:0.3:0.1"``).

    Values are produced in decimal, so ``0:1:0.05`` yields exactly the floats
    ``--lmbda 0.15`` etc. would parse to.  Duplicates are dropped, order kept.
    """
    values = []
    try:
        for item in str(text).split(","):
            item = item.strip()
            if not item:
                continue
            parts = item.split(":")
            if len(parts) == 1:
                values.append(Decimal(parts[0]))
            elif len(parts) == 3:
                start, stop, step = (Decimal(p) for p in parts)
                if step <= 0 or stop < start:
                    raise ValueError
                count = int((stop - start) / step)
                values.extend(start + i * step for i in range(count + 1))
            else:
                raise ValueError
    except (InvalidOperation, ValueError):
        raise SweepError(
            f"cannot parse {option} {text!r}; give values like 1,2,5 or an inclusive range START:STOP:STEP"
        ) from None
    if not values:
        raise SweepError(f"{option} {text!r} gives no values")
    out = []
    for v in values:
        if cast is int:
            if v != v.to_integral_value():
                raise SweepError(f"{option} takes integers, got {v}")
            c = int(v)
        else:
            c = float(str(v))
        if c not in out:
            out.append(c)
    return out


def check_grid(ks: Sequence[int], temps: Sequence[float], lambdas: Sequence[float],
               saved_k: int, path: str = "the neighbours file") -> None:
    """One-line errors for grid values no fairseq-eval-lm run could use."""
    for lam in lambdas:
        if not 0.0 <= lam <= 1.0:
            raise SweepError(f"--lmbda values must lie in [0, 1], got {lam}")
    for t in temps:
        if not t > 0:
            raise SweepError(f"--knn-temp values must be positive, got {t}")
    for k in ks:
        if k < 1:
            raise SweepError(f"--k values must be at least 1, got {k}")
        if k > saved_k:
            raise SweepError(
                f"--k {k} exceeds the {saved_k} neighbours saved in {path}; lower --k "
                f"or save again with --k {k} --knn-save-neighbors"
            )


@contextlib.contextmanager
def single_torch_thread():
    """Run torch ops on the calling thread only.

    The sweep's tensors are small or processed chunk-per-thread; intra-op
    threads would only add synchronisation, which costs many times the work
    on a busy machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------- kNN probabilities
# Below exp(-80) a neighbour's share of the softmax is < 2e-35 of the nearest
# one's: clamping there avoids float32's slow denormal path and changes no sum
# that matters; rows whose matched mass is below 1e-20 are redone in log space.
_EXP_FLOOR = -80.0
_EXACT_BELOW = 1e-20


def knn_target_log_probs_fast(dists: torch.Tensor, match: torch.Tensor, temperature: float,
                              work: Optional[torch.Tensor] = None, scratch: Optional[torch.Tensor] = None,
                              nearest: Optional[torch.Tensor] = None, shifted: Optional[torch.Tensor] = None,
                              has_match: Optional[torch.Tensor] = None):
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
    weights (``work``'s storage when given).
    """
    if shifted is None:
        nearest = dists.amin(dim=1, keepdim=True)
        shifted = dists - nearest
    scale = -1.0 / temperature
    x = torch.mul(shifted, scale, out=work) if work is not None else shifted * scale
    x.clamp_(min=_EXP_FLOOR).exp_()
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
        xr.masked_fill_(match[redo] == 0, -math.inf)
        peak = xr.amax(dim=1, keepdim=True)
        mass = xr.sub_(peak).clamp_(min=_EXP_FLOOR).exp_().mul_(match[redo]).sum(dim=1)
        out[redo] = peak.squeeze(1) + mass.log() - total[redo].log()
    empty = torch.isinf(nearest)  # no neighbour retrieved at all
    if empty.any():
        out[empty] = -math.inf
    return out, total.reciprocal(), nearest, x


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


def default_threads() -> int:
    return max(1, min(4, torch.get_num_threads()))


def _table_chunk(nb, s, e, ks, temps, kmax, signals, exact, out, sig):
    """Fill out[:, :, s:e] (and sig) from rows s:e; one thread, private buffers."""
    # np.array copies: the chunk must not alias the read-only memory map.
    d_all = torch.from_numpy(np.array(nb.dists[s:e][:, :kmax], dtype=np.float32))
    v_all = torch.from_numpy(np.array(nb.vals[s:e][:, :kmax], dtype=np.int32))
    t = torch.from_numpy(np.array(nb.targets[s:e], dtype=np.int32))
    match_all = (v_all == t.unsqueeze(1)).float()
    if signals:
        gid_all, first_all = value_groups(v_all)
    buffers = [torch.empty_like(d_all) for _ in range(3)]
    for ki, k in enumerate(ks):
        if k == kmax:
            d, v, match = d_all, v_all, match_all
        else:
            d, v, match = (a[:, :k].contiguous() for a in (d_all, v_all, match_all))
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
                out[ki, ti, s:e] = knn_math.knn_target_log_probs(d, v, t, T).numpy()
            if signals or not exact:
                lp, top_w, nn_d, weights = knn_target_log_probs_fast(
                    d, match, T, work, scratch, nearest=nearest, shifted=shifted, has_match=has_match)
                if not exact:
                    out[ki, ti, s:e] = lp.numpy()
            if signals:
                grouped = weights.new_zeros(len(weights), kmax).scatter_add_(1, gid, weights)
                sig["knn_max_prob"][ki, ti, s:e] = (grouped.amax(dim=1) * top_w).numpy()
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
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(spans), desc="kNN probabilities", unit="chunk", leave=False, disable=None)
    threads = max(1, min(threads or default_threads(), len(spans) or 1))
    # One thread per chunk rather than per op: no synchronisation inside a chunk.
    try:
        with torch.no_grad(), single_torch_thread():
            job = lambda span: _table_chunk(nb, *span, ks, temps, kmax, signals, exact, out, sig)  # noqa: E731
            if threads == 1:
                for span in spans:
                    job(span)
                    bar is not None and bar.update()
            else:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(threads) as pool:
                    for _ in pool.map(job, spans):
                        bar is not None and bar.update()
    finally:
        if bar is not None:
            bar.close()
    return KnnTable(ks, temps, out, sig)


# ------------------------------------------------------------ perplexity
@dataclass
class PplStat:
    loss: float     # base 2, as fairseq-eval-lm prints it
    ppl: float
    count: int      # tokens summed
    skipped: int    # tokens with ±inf score, skipped as fairseq-eval-lm does


def segment_starts(segments: np.ndarray, n: int) -> np.ndarray:
    seg = np.asarray(segments, dtype=np.int64)
    seg = seg[seg > 0]
    if seg.sum() != n:
        seg = np.array([n] if n else [], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(seg)[:-1]]).astype(np.int64) if len(seg) else seg


def eval_lm_perplexity(scores: np.ndarray, starts: np.ndarray) -> PplStat:
    """Perplexity of per-token natural-log scores, summed as fairseq-eval-lm sums them.

    eval-lm drops ±inf scores, sums each scored sequence in float32 and adds
    the sums into a float32 total, then prints ``2 ** (-total / count / ln 2)``.
    Sequence sums are taken here in float64 and rounded, the running total is
    float32 in the same order; ``starts`` from :func:`segment_starts`.
    """
    scores = np.asarray(scores)
    inf = np.isinf(scores)
    skipped = int(inf.sum())
    count = int(scores.size - skipped)
    if count == 0:
        return PplStat(0.0, 1.0, 0, skipped)
    clean = np.where(inf, 0.0, scores.astype(np.float64)) if skipped else scores.astype(np.float64)
    seq_sums = np.add.reduceat(clean, starts).astype(np.float32)
    score_sum = torch.tensor(np.cumsum(seq_sums, dtype=np.float32)[-1])
    loss = -score_sum / count / math.log(2)
    return PplStat(float(loss), float(2 ** loss), count, skipped)


def mean_perplexity(scores: np.ndarray) -> Tuple[float, int, int]:
    """(exp of the mean negative log-prob over finite scores, count, skipped), in float64."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = ~np.isinf(scores)
    count = int(finite.sum())
    if count == 0:
        return float("nan"), 0, int(scores.size)
    return float(np.exp(-scores[finite].mean())), count, int(scores.size - count)


def interpolated(lm: np.ndarray, knn: np.ndarray, lmbda: float) -> np.ndarray:
    """knn_math.interpolate on numpy arrays (float32 in, float32 out)."""
    lm, knn = (a if a.flags.writeable else a.copy() for a in (np.asarray(lm), np.asarray(knn)))
    return knn_math.interpolate(torch.from_numpy(lm), torch.from_numpy(knn), lmbda).numpy()


@dataclass
class SweepResult:
    ks: List[int]
    temps: List[float]
    lambdas: List[float]
    ppl: np.ndarray       # (K, T, L)
    loss: np.ndarray      # (K, T, L), base 2
    skipped: np.ndarray   # (K, T, L) int
    count: np.ndarray     # (K, T, L) int
    base: PplStat         # the LM alone (λ = 0)

    def best(self) -> Tuple[int, int, int]:
        """Index (ki, ti, li) of the lowest perplexity among settings that skip no more
        tokens than the fewest any setting skips (a perplexity over fewer tokens is
        not comparable)."""
        ok = self.skipped == self.skipped.min()
        masked = np.where(ok & ~np.isnan(self.ppl), self.ppl, np.inf)
        return tuple(int(i) for i in np.unravel_index(np.argmin(masked), masked.shape))

    def setting(self, index) -> Dict:
        ki, ti, li = index
        return dict(k=self.ks[ki], knn_temp=self.temps[ti], lmbda=self.lambdas[li],
                    ppl=float(self.ppl[index]), loss=float(self.loss[index]),
                    skipped=int(self.skipped[index]))


def sweep(lm_log_probs: np.ndarray, table: KnnTable, lambdas: Sequence[float],
          segments: np.ndarray) -> SweepResult:
    """Perplexity for every (k, T, λ): one interpolation per cell, no re-reading."""
    lm = np.array(lm_log_probs, dtype=np.float32)  # a writable copy, not the memory map
    starts = segment_starts(segments, len(lm))
    shape = (len(table.ks), len(table.temps), len(lambdas))
    ppl, loss = np.empty(shape), np.empty(shape)
    skipped, count = np.empty(shape, dtype=np.int64), np.empty(shape, dtype=np.int64)
    with single_torch_thread():
        base = eval_lm_perplexity(lm, starts)
        for ki in range(shape[0]):
            for ti in range(shape[1]):
                knn = table.knn_log_probs[ki, ti]
                for li, lam in enumerate(lambdas):
                    stat = base if lam == 0 else eval_lm_perplexity(interpolated(lm, knn, lam), starts)
                    ppl[ki, ti, li], loss[ki, ti, li] = stat.ppl, stat.loss
                    skipped[ki, ti, li], count[ki, ti, li] = stat.skipped, stat.count
    return SweepResult(list(table.ks), list(table.temps), [float(x) for x in lambdas],
                       ppl, loss, skipped, count, base)


# ------------------------------------------------------------- analysis
def token_counts(token_ids, vocab_size: int = 0, chunk: int = 1 << 24) -> np.ndarray:
    """How often each token id occurs (e.g. a datastore's vals), streamed in chunks."""
    counts = np.zeros(max(vocab_size, 0), dtype=np.int64)
    for s in range(0, len(token_ids), chunk):
        part = np.asarray(token_ids[s : s + chunk]).astype(np.int64, copy=False)
        part = part[part >= 0]
        c = np.bincount(part, minlength=len(counts))
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


# ------------------------------------------------- adaptive interpolation
@dataclass
class BucketedLambda:
    """λ per bucket of a test-time signal: bucket b holds edges[b-1] <= s < edges[b]."""

    signal: str
    k: int
    temp: float
    edges: np.ndarray       # interior bucket edges, ascending
    lambdas: np.ndarray     # one λ per bucket (len(edges) + 1)
    fit_loglik: float       # summed natural-log likelihood on the fit split

    def bucket(self, signal: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges, signal, side="right")

    def apply(self, signal: np.ndarray, lm: np.ndarray, knn: np.ndarray) -> np.ndarray:
        """Per-token interpolated log-probs with each token's bucket λ (never the target)."""
        b = self.bucket(signal)
        final = np.empty(len(lm), dtype=np.float32)
        for i, lam in enumerate(self.lambdas):
            sel = b == i
            if sel.any():
                final[sel] = interpolated(lm[sel], knn[sel], float(lam))
        return final


def fit_bucketed_lambda(signal: np.ndarray, lm: np.ndarray, knn: np.ndarray,
                        lambdas: Sequence[float], num_buckets: int,
                        name: str = "", k: int = 0, temp: float = 0.0) -> BucketedLambda:
    """Quantile buckets of ``signal`` and the λ (from ``lambdas``) that maximises each
    bucket's likelihood on this (fit) split.  λ = 1 is never chosen: on another split
    a target the neighbours miss would get probability 0."""
    candidates = [float(x) for x in lambdas if x < 1]
    if not candidates:
        raise SweepError("adaptive λ needs --lmbda values below 1")
    signal = np.asarray(signal, dtype=np.float64)
    qs = np.linspace(0, 1, num_buckets + 1)[1:-1]
    finite = signal[np.isfinite(signal)]
    edges = np.unique(np.quantile(finite, qs)) if len(finite) and len(qs) else np.array([])
    b = np.searchsorted(edges, signal, side="right")
    nb = len(edges) + 1
    sums = np.empty((len(candidates), nb))
    for i, lam in enumerate(candidates):
        final = interpolated(lm, knn, lam).astype(np.float64)
        sums[i] = np.bincount(b, weights=final, minlength=nb)
    sums = np.nan_to_num(sums, nan=-np.inf)
    choice = np.argmax(sums, axis=0)
    best = sums[choice, np.arange(nb)]
    return BucketedLambda(name, int(k), float(temp), edges,
                          np.asarray(candidates)[choice], float(best.sum()))


@dataclass
class AdaptiveReport:
    fixed: Dict                   # best fixed setting chosen on the fit split
    fixed_fit: PplStat
    fixed_eval: PplStat
    oracle: Dict                  # best fixed setting on the evaluation split itself
    per_signal: List[Tuple[BucketedLambda, PplStat, PplStat]]  # model, fit, eval
    chosen: int                   # index into per_signal, chosen on the fit split

    @property
    def beats_fixed(self) -> bool:
        model, _, ev = self.per_signal[self.chosen]
        return ev.skipped <= self.fixed_eval.skipped and ev.ppl < self.fixed_eval.ppl


def adaptive_comparison(*args, **kwargs) -> "AdaptiveReport":
    """Fit per-bucket λ on one split, apply to another, against the best fixed λ.

    Everything that is chosen (the fixed setting, each signal's k, T and
    bucket λs, and which signal to report) is chosen on the fit split only.
    Arguments as :func:`_adaptive_comparison`.
    """
    with single_torch_thread():
        return _adaptive_comparison(*args, **kwargs)


def _adaptive_comparison(fit_lm, fit_table: KnnTable, fit_segments, fit_result: SweepResult,
                        eval_lm, eval_table: KnnTable, eval_segments, eval_result: SweepResult,
                        lambdas: Sequence[float], num_buckets: int,
                        signals: Sequence[str] = SIGNALS) -> AdaptiveReport:
    """Fit per-bucket λ on one split, apply to another, against the best fixed λ.

    Everything that is chosen (the fixed setting, each signal's k, T and
    bucket λs, and which signal to report) is chosen on the fit split only.
    """
    fit_lm = np.array(fit_lm, dtype=np.float32)
    eval_lm = np.array(eval_lm, dtype=np.float32)
    fit_starts = segment_starts(fit_segments, len(fit_lm))
    eval_starts = segment_starts(eval_segments, len(eval_lm))
    best = fit_result.best()
    fixed = fit_result.setting(best)
    ki, ti, li = best
    lam = fit_result.lambdas[li]
    fixed_fit = eval_lm_perplexity(interpolated(fit_lm, fit_table.knn_log_probs[ki, ti], lam), fit_starts)
    fixed_eval = eval_lm_perplexity(interpolated(eval_lm, eval_table.knn_log_probs[ki, ti], lam), eval_starts)
    per_signal = []
    for name in signals:
        if name not in fit_table.signals:
            raise SweepError(f"signal {name!r} was not computed; choose from {', '.join(SIGNALS)}")
        fitted = []
        for ki, k in enumerate(fit_table.ks):
            for ti, T in enumerate(fit_table.temps):
                fitted.append(((ki, ti), fit_bucketed_lambda(
                    fit_table.signals[name][ki, ti], fit_lm, fit_table.knn_log_probs[ki, ti],
                    lambdas, num_buckets, name, k, T)))
        (ki, ti), model = max(fitted, key=lambda item: item[1].fit_loglik)
        fit_stat = eval_lm_perplexity(
            model.apply(fit_table.signals[name][ki, ti], fit_lm, fit_table.knn_log_probs[ki, ti]), fit_starts)
        eval_stat = eval_lm_perplexity(
            model.apply(eval_table.signals[name][ki, ti], eval_lm, eval_table.knn_log_probs[ki, ti]), eval_starts)
        per_signal.append((model, fit_stat, eval_stat))
    chosen = int(np.argmax([m.fit_loglik for m, _, _ in per_signal]))
    return AdaptiveReport(fixed, fixed_fit, fixed_eval, eval_result.setting(eval_result.best()),
                          per_signal, chosen)
