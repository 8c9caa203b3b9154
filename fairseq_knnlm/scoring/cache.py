"""Continuous cache (Grave et al., 2017): the evaluated text's own recent past as a second memory.

For the scored token at stream position t (scored tokens in corpus order), the
cache holds the (key, next token) pairs of the N scored positions before it,
i = t-N .. t-1, and predicts

    p_cache(w | t) ∝ Σ_{i ∈ [t-N, t), y_i = w} exp(θ · q_t · q_i)

where q_i is position i's key -- the hidden state the kNN-LM searches with
(``--knn-keytype``) -- and y_i its target.  It is interpolated with the model's
distribution as Grave et al. interpolate it with their LM:

    p(w | t) = (1 − λ_c) · p_model(w | t) + λ_c · p_cache(w | t)

where p_model is the kNN-LM's λ·p_kNN + (1 − λ)·p_LM with ``--knnlm`` and the
LM's otherwise (the kNN-LM paper's "kNN-LM + continuous cache").  θ = 0 is the
classic count-based cache (each of the N entries weighs the same).  The first
scored token of a run has an empty cache and keeps the model's probability.

Dot products are computed in float64 from the float32 keys and the cache
probability is rounded to float32 last, so the same token gets the same
float32 probability whether it is computed in fairseq-eval-lm's batches or
offline in other chunks (:mod:`fairseq_knnlm.sweep.cache`): only the order
in which BLAS sums a dot product differs, far below float32's resolution.
"""

import math
from typing import Optional, Sequence

import torch

from . import knn_math
from ..errors import UserError

# Queries per chunk: a chunk's similarities are rows x (window + rows) float64 values.
_WINDOW_ELEMENTS = 1 << 20


def default_chunk_rows(size: int) -> int:
    return max(16, _WINDOW_ELEMENTS // max(int(size), 1))


def cache_log_probs(keys: torch.Tensor, vals: torch.Tensor, first: int, sizes: Sequence[int],
                    thetas: Sequence[float], chunk_rows: Optional[int] = None) -> torch.Tensor:
    """log p_cache(target) for the rows ``first ..`` of a stretch of the scored stream.

    ``keys`` (m, dim) and ``vals`` (m,) are consecutive scored positions in
    corpus order: rows ``[0, first)`` are history (only the last ``max(sizes)``
    of them matter), rows ``[first, m)`` are the ones scored here, each with the
    rows before it as its cache and ``vals`` as its target.  Returns
    (len(sizes), len(thetas), m - first) float32: natural-log probabilities,
    -inf where the target is not in the cache, NaN where the cache is empty
    (the stream's first row).  For each row the window is ordered newest
    first and accumulated with ``logcumsumexp``, so every size of the grid
    comes from one pass and a smaller cache is a prefix of a larger one.
    """
    sizes = [int(s) for s in sizes]
    thetas = [float(t) for t in thetas]
    width = max(sizes)
    m = keys.size(0)
    device = keys.device
    out = torch.empty(len(sizes), len(thetas), m - first, dtype=torch.float32, device=device)
    rows = int(chunk_rows or default_chunk_rows(width))
    vals = vals.long()
    back = torch.arange(1, width + 1, device=device)  # offsets of the window, newest first
    cols = torch.as_tensor([s - 1 for s in sizes], device=device)
    for a in range(first, m, rows):
        b = min(a + rows, m)
        lo = max(0, a - width)
        sims = keys[a:b].double() @ keys[lo:b].double().T  # (rows, b - lo)
        pos = torch.arange(a, b, device=device).unsqueeze(1) - back  # (rows, width) stream positions
        valid = pos >= 0
        idx = (pos - lo).clamp(min=0)
        window = sims.gather(1, idx)
        match = (vals[lo:b][idx] == vals[a:b].unsqueeze(1)) & valid
        for ti, theta in enumerate(thetas):
            logits = (window * theta).masked_fill_(~valid, -math.inf)
            total = torch.logcumsumexp(logits, dim=1).index_select(1, cols)
            matched = torch.logcumsumexp(logits.masked_fill_(~match, -math.inf), dim=1).index_select(1, cols)
            lp = torch.where(torch.isfinite(total), matched - total, torch.full_like(total, math.nan))
            out[:, ti, a - first : b - first] = lp.T.float()
    return out


def interpolate_cache(model_log_probs: torch.Tensor, cache_lp: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log((1 − λ_c)·p_model + λ_c·p_cache) in float32; tokens with an empty cache (NaN) keep
    the model's log-probability, and λ_c = 0 returns ``model_log_probs`` itself."""
    if lmbda == 0:
        return model_log_probs
    empty = torch.isnan(cache_lp)
    mixed = knn_math.interpolate(model_log_probs, cache_lp.masked_fill(empty, -math.inf), lmbda)
    return torch.where(empty, model_log_probs, mixed)


class ContinuousCache:
    """fairseq-eval-lm's cache: batches arrive in corpus order, each one is scored against
    the last ``size`` scored positions before it and then joins them."""

    def __init__(self, size: int, theta: float, lmbda: float):
        self.size, self.theta, self.lmbda = int(size), float(theta), float(lmbda)
        self.keys: Optional[torch.Tensor] = None  # (<= size, dim) float32, oldest first
        self.vals: Optional[torch.Tensor] = None
        self.last_id = -1
        self.tokens = 0

    def __call__(self, queries: torch.Tensor, targets: torch.Tensor, scores: torch.Tensor,
                 ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This batch's scores, each combined with its cache; then the batch enters the cache.

        ``queries`` (n, dim), ``targets`` (n,) and ``scores`` (n,) are the batch's scored
        positions in corpus order; ``ids``: its rows' sample ids, which must increase
        across batches (fairseq-eval-lm with --context-window reads the split in order).
        """
        if ids is not None and ids.numel():
            ids = ids.tolist()
            if ids[0] <= self.last_id or any(b <= a for a, b in zip(ids, ids[1:])):
                raise UserError(
                    "--knn-cache-size needs the evaluated blocks in corpus order, but fairseq-eval-lm "
                    f"delivered block {ids[0]} after block {self.last_id}; run fairseq-eval-lm with "
                    "--context-window > 0 in one process")
            self.last_id = ids[-1]
        self.tokens += targets.numel()
        if self.lmbda == 0 or not targets.numel():
            return scores  # the model's scores, bit for bit; nothing to remember
        queries, targets = queries.float(), targets.long()
        history = 0 if self.keys is None else self.keys.size(0)
        keys = queries if self.keys is None else torch.cat([self.keys, queries])
        vals = targets if self.vals is None else torch.cat([self.vals, targets])
        lp = cache_log_probs(keys, vals, history, [self.size], [self.theta])[0, 0]
        self.keys, self.vals = keys[-self.size:].clone(), vals[-self.size:].clone()
        return interpolate_cache(scores, lp.to(scores.device), self.lmbda)

    def describe(self) -> str:
        return (f"continuous cache: {self.tokens:,} scored tokens, each with the last {self.size:,} before it "
                f"(θ {self.theta:g}, λ_c {self.lmbda:g})")


# ------------------------------------------------------------ the run's flags
def cache_enabled(args) -> bool:
    return int(getattr(args, "knn_cache_size", 0) or 0) > 0


def make_cache(args) -> Optional[ContinuousCache]:
    if not cache_enabled(args):
        return None
    return ContinuousCache(args.knn_cache_size, args.knn_cache_theta, args.knn_cache_lmbda)
