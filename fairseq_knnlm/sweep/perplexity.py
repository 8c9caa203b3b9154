"""Perplexity as fairseq-eval-lm computes it, and the λ sweep over a kNN table."""

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..scoring import knn_math
from .knn_table import KnnTable
from .threads import single_torch_thread


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
