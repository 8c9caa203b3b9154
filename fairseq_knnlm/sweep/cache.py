"""The continuous cache offline: p_cache for every (size, θ) from the saved keys, and the joint
sweep of the kNN weight λ and the cache weight λ_c.

A neighbours file saved by a run with ``--knn-cache-size`` holds every scored
token's key (``queries.npy``) in the order eval-lm scored them, which for one
process is corpus order: row i's cache is rows i-N .. i-1 of the file.  The
cache probabilities are computed by :func:`fairseq_knnlm.cache.cache_log_probs`
(the function eval-lm uses) and interpolated by
:func:`fairseq_knnlm.cache.interpolate_cache`, so every grid point is the
perplexity eval-lm prints with those flags.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..integration.flags import check_value
from ..scoring.cache import cache_log_probs, default_chunk_rows, interpolate_cache
from .grid import SweepError
from .perplexity import PplStat, eval_lm_perplexity, interpolated, segment_starts
from .threads import run_in_chunks, single_torch_thread


def check_cache_inputs(nb, sizes: Sequence[int], thetas: Sequence[float], cache_lambdas: Sequence[float]) -> None:
    """One-line errors for a file or grid the cache sweep cannot use."""
    if getattr(nb, "queries", None) is None:
        raise SweepError(
            f"{nb.path} holds no keys, which the cache needs; save the neighbours from a run with "
            "--knn-cache-size N (fairseq-eval-lm --knnlm --knn-cache-size N --knn-save-neighbors ...)")
    if int(nb.meta.get("num_shards") or 1) > 1:
        raise SweepError(f"{nb.path} was saved in shards; the cache needs one stream: save it with one process")
    for size in sizes:
        if size < 1:
            raise SweepError(f"--knn-cache-size values must be at least 1, got {size}")
    for theta in thetas:
        check_value("--knn-cache-theta", theta)
    for lam in cache_lambdas:
        check_value("--knn-cache-lmbda", lam)


@dataclass
class CacheTable:
    """log p_cache(target) for every (size, θ): (len(sizes), len(thetas), n) float32, NaN: empty cache."""

    sizes: List[int]
    thetas: List[float]
    log_probs: np.ndarray


def _table_chunk(nb, a, b, sizes, thetas, out):
    lo = max(0, a - max(sizes))
    keys = torch.from_numpy(np.array(nb.queries[lo:b], dtype=np.float32))
    vals = torch.from_numpy(np.array(nb.targets[lo:b], dtype=np.int64))
    out[:, :, a:b] = cache_log_probs(keys, vals, a - lo, sizes, thetas).numpy()


def cache_table(nb, sizes: Sequence[int], thetas: Sequence[float], chunk_rows: Optional[int] = None,
                threads: Optional[int] = None, progress: bool = False) -> CacheTable:
    """p_cache of every saved token for every size and θ, in one pass over the saved keys.

    Rows are processed in chunks (each with the ``max(sizes)`` rows before it as
    history), chunks in ``threads`` parallel threads, each single-threaded.
    """
    sizes, thetas = [int(s) for s in sizes], [float(t) for t in thetas]
    check_cache_inputs(nb, sizes, thetas, [])
    n = nb.n
    rows = int(chunk_rows or 4 * default_chunk_rows(max(sizes)))
    out = np.empty((len(sizes), len(thetas), n), dtype=np.float32)
    spans = [(a, min(a + rows, n)) for a in range(0, n, rows)]
    job = lambda span: _table_chunk(nb, *span, sizes, thetas, out)  # noqa: E731
    run_in_chunks(job, spans, threads, progress, desc="cache probabilities")
    return CacheTable(sizes, thetas, out)


def with_cache(model: np.ndarray, cache: np.ndarray, lmbda: float) -> np.ndarray:
    """:func:`fairseq_knnlm.cache.interpolate_cache` on numpy arrays (float32 in, float32 out)."""
    model, cache = (a if a.flags.writeable else a.copy() for a in (np.asarray(model), np.asarray(cache)))
    return interpolate_cache(torch.from_numpy(model), torch.from_numpy(cache), lmbda).numpy()


ROWS = ("base", "cache", "knn", "both")
ROW_NAMES = {"base": "base LM", "cache": "+ cache", "knn": "+ kNN", "both": "+ kNN + cache"}


@dataclass
class CacheSweep:
    """Perplexity for every (size, θ, λ, λ_c) at one kNN setting (k, T)."""

    k: int
    knn_temp: float
    sizes: List[int]
    thetas: List[float]
    lambdas: List[float]          # λ of the kNN-LM; always holds 0
    cache_lambdas: List[float]    # λ_c; always holds 0
    ppl: np.ndarray               # (S, Θ, L, C)
    loss: np.ndarray
    skipped: np.ndarray
    base: PplStat

    def best(self, knn: bool = True, cache: bool = True, size_index: Optional[int] = None):
        """Index of the lowest perplexity (among settings skipping the fewest tokens); ``knn`` /
        ``cache`` False restrict λ / λ_c to 0, ``size_index`` to one cache size."""
        ok = np.ones(self.ppl.shape, dtype=bool)
        if size_index is not None:
            ok[[i for i in range(len(self.sizes)) if i != size_index]] = False
        if not knn:
            ok[:, :, [i for i, x in enumerate(self.lambdas) if x != 0]] = False
        if not cache:
            ok[:, :, :, [i for i, x in enumerate(self.cache_lambdas) if x != 0]] = False
        fewest = self.skipped[ok].min()
        masked = np.where(ok & (self.skipped == fewest) & ~np.isnan(self.ppl), self.ppl, np.inf)
        return tuple(int(i) for i in np.unravel_index(np.argmin(masked), masked.shape))

    def setting(self, index) -> Dict:
        si, ti, li, ci = index
        lam, clam = self.lambdas[li], self.cache_lambdas[ci]
        return dict(k=self.k, knn_temp=self.knn_temp, lmbda=lam,
                    cache_size=self.sizes[si] if clam else 0, cache_theta=self.thetas[ti] if clam else None,
                    cache_lmbda=clam, ppl=float(self.ppl[index]), loss=float(self.loss[index]),
                    skipped=int(self.skipped[index]))

    def rows(self) -> Dict[str, Dict]:
        """The four models, each at its best setting of the grid: base LM, + cache (λ = 0),
        + kNN (λ_c = 0) and + kNN + cache."""
        base = self.setting(self.best(knn=False, cache=False))
        return dict(base=base, cache=self.setting(self.best(knn=False)),
                    knn=self.setting(self.best(cache=False)), both=self.setting(self.best()))


def flags(setting: Dict) -> str:
    """The fairseq-eval-lm flags of a setting of :meth:`CacheSweep.setting`."""
    parts = []
    if setting["lmbda"]:
        parts.append(f"--knnlm --k {setting['k']} --knn-temp {setting['knn_temp']:g} --lmbda {setting['lmbda']:g}")
    if setting["cache_lmbda"]:
        parts.append(f"--knn-cache-size {setting['cache_size']} --knn-cache-theta {setting['cache_theta']:g} "
                     f"--knn-cache-lmbda {setting['cache_lmbda']:g}")
    return " ".join(parts) or "(the base LM)"


def _with_zero(values: Sequence[float]) -> List[float]:
    values = [float(v) for v in values]
    return values if 0.0 in values else [0.0] + values


def cache_sweep(lm: np.ndarray, knn: np.ndarray, lambdas: Sequence[float], table: CacheTable,
                cache_lambdas: Sequence[float], segments: np.ndarray, k: int = 0,
                knn_temp: float = 0.0) -> CacheSweep:
    """Perplexity for every (size, θ, λ, λ_c) at one (k, T), as fairseq-eval-lm sums it.

    ``lm``: the saved log p_LM(target); ``knn``: log p_kNN(target) at (k, T).
    λ = 0 and λ_c = 0 are always in the grid (the base LM and each memory alone).
    """
    lm = np.array(lm, dtype=np.float32)
    lambdas, cache_lambdas = _with_zero(lambdas), _with_zero(cache_lambdas)
    starts = segment_starts(segments, len(lm))
    shape = (len(table.sizes), len(table.thetas), len(lambdas), len(cache_lambdas))
    ppl, loss = np.empty(shape), np.empty(shape)
    skipped = np.empty(shape, dtype=np.int64)
    with single_torch_thread():
        base = eval_lm_perplexity(lm, starts)
        for li, lam in enumerate(lambdas):
            model = interpolated(lm, knn, lam)
            for ci, clam in enumerate(cache_lambdas):
                cells = [(si, ti) for si in range(shape[0]) for ti in range(shape[1])]
                if clam == 0:  # no cache: the same numbers for every size and θ
                    stat = eval_lm_perplexity(model, starts)
                    stats = [stat] * len(cells)
                else:
                    stats = [eval_lm_perplexity(with_cache(model, table.log_probs[si, ti], clam), starts)
                             for si, ti in cells]
                for (si, ti), stat in zip(cells, stats):
                    ppl[si, ti, li, ci], loss[si, ti, li, ci] = stat.ppl, stat.loss
                    skipped[si, ti, li, ci] = stat.skipped
    return CacheSweep(int(k), float(knn_temp), list(table.sizes), list(table.thetas), lambdas, cache_lambdas,
                      ppl, loss, skipped, base)

