"""Adaptive interpolation: λ per bucket of a test-time signal, fit on one split and
reported on another against the best fixed λ."""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .grid import SweepError
from .knn_table import SIGNALS, KnnTable
from .perplexity import PplStat, SweepResult, eval_lm_perplexity, interpolated, segment_starts
from .threads import single_torch_thread


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
