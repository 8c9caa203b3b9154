"""Adaptive retrieval offline: perplexity against the fraction of tokens searched.

At retrieval fraction f the tokens whose predictor score reaches the fit
split's threshold for f are searched (the fixed k, T, λ); the others keep the
LM's log-probability, exactly as fairseq-eval-lm does with
``--knn-retrieval-predictor FILE --knn-retrieval-fraction f``.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..retrieval.adaptive import FEATURE_NAMES, RetrievalPredictor, fit_predictor, fraction_thresholds
from .grid import SweepError
from .perplexity import PplStat, eval_lm_perplexity, interpolated, segment_starts

# Fields of the neighbours file copied into the predictor: what it is tied to, and how it was fit.
PREDICTOR_META_FIELDS = ("checkpoint", "checkpoint_sha256", "dictionary_md5", "dictionary_size",
                         "dstore", "dstore_fingerprint", "dstore_size", "keytype", "sim_func", "data",
                         "context_window", "tokens_per_sample")


@dataclass
class RetrievalCurve:
    """Perplexity of one split at every retrieval fraction of a grid."""

    split: str
    fractions: List[float]
    searched: np.ndarray            # fraction of tokens actually searched, per fraction
    stats: List[PplStat]            # predictor's selection
    random_ppl: np.ndarray          # the same number of tokens chosen at random (a baseline)
    oracle_ppl: np.ndarray          # the tokens retrieval helps most (needs the target: a bound)
    full: PplStat                   # every token searched
    base: PplStat                   # none searched

    def rows(self) -> List[Dict]:
        return [dict(fraction=f, searched=float(s), ppl=st.ppl, loss=st.loss, skipped=st.skipped,
                     random_ppl=float(r), oracle_ppl=float(o))
                for f, s, st, r, o in zip(self.fractions, self.searched, self.stats, self.random_ppl,
                                          self.oracle_ppl)]


@dataclass
class RetrievalReport:
    predictor: RetrievalPredictor
    fit: RetrievalCurve
    held_out: Optional[RetrievalCurve] = None
    setting: Dict = field(default_factory=dict)   # k, knn_temp, lmbda of the fit


def retrieval_curve(scores: np.ndarray, thresholds: Sequence[float], fractions: Sequence[float],
                    lm: np.ndarray, final: np.ndarray, segments: np.ndarray, split: str = "",
                    seed: int = 0) -> RetrievalCurve:
    """Perplexities when the tokens with ``scores >= threshold`` get ``final`` and the
    others ``lm`` (float32 log-probs), summed as fairseq-eval-lm sums them."""
    lm = np.asarray(lm, dtype=np.float32)
    final = np.asarray(final, dtype=np.float32)
    starts = segment_starts(segments, len(lm))
    n = len(lm)
    gain_order = np.argsort(-(final.astype(np.float64) - lm), kind="stable")
    random_order = np.random.default_rng(seed).permutation(n)
    searched, stats, random_ppl, oracle_ppl = [], [], [], []
    for t in thresholds:
        selected = RetrievalPredictor.select(scores, t)
        searched.append(selected.mean() if n else 0.0)
        stats.append(eval_lm_perplexity(np.where(selected, final, lm), starts))
        m = int(selected.sum())
        for order, out in ((random_order, random_ppl), (gain_order, oracle_ppl)):
            same_count = np.zeros(n, dtype=bool)
            same_count[order[:m]] = True
            out.append(eval_lm_perplexity(np.where(same_count, final, lm), starts).ppl)
    return RetrievalCurve(split, [float(f) for f in fractions], np.asarray(searched), stats,
                          np.asarray(random_ppl), np.asarray(oracle_ppl),
                          eval_lm_perplexity(final, starts), eval_lm_perplexity(lm, starts))


def check_features(nb, option: str) -> None:
    if nb.lm_features is None:
        raise SweepError(
            f"{option} {nb.path} was saved without LM features, which adaptive retrieval needs; "
            "save it again with fairseq-eval-lm --knnlm --knn-save-neighbors (this version saves them)")
    if nb.feature_names != list(FEATURE_NAMES):
        raise SweepError(
            f"{option} {nb.path} holds LM features {nb.feature_names}, this version uses "
            f"{list(FEATURE_NAMES)}; save the neighbours again with this version")


def adaptive_retrieval(fit_nb, fit_knn: np.ndarray, setting: Dict, fractions: Sequence[float],
                       held_out_nb=None, held_out_knn: Optional[np.ndarray] = None) -> RetrievalReport:
    """Fit the predictor on ``fit_nb`` at ``setting`` (k, knn_temp, lmbda) and report the
    curve there and, with thresholds from the fit split, on ``held_out_nb``.

    ``fit_knn`` / ``held_out_knn``: log p_kNN(target) of each file at that (k, T).
    The predictor's target is each token's gain from retrieval, the interpolated
    log-prob minus the LM's.
    """
    lmbda = float(setting["lmbda"])
    lm = np.array(fit_nb.lm_log_probs, dtype=np.float32)
    final = interpolated(lm, fit_knn, lmbda)
    features = np.asarray(fit_nb.lm_features, dtype=np.float32)
    predictor = fit_predictor(features, final.astype(np.float64) - lm, fit_nb.feature_names)
    scores = predictor.score(features)
    predictor.thresholds = fraction_thresholds(scores, fractions)
    meta = fit_nb.meta
    predictor.meta = {key: meta.get(key) for key in PREDICTOR_META_FIELDS}
    predictor.meta.update(
        k=int(setting["k"]), knn_temp=float(setting["knn_temp"]), lmbda=lmbda,
        fit_split=meta.get("split"), fit_neighbors=fit_nb.path, fit_neighbors_id=meta.get("id"),
        fit_tokens=int(fit_nb.n), target="gain in log p(target) from retrieval at k, knn_temp, lmbda",
    )
    thresholds = [predictor.thresholds[float(f)] for f in fractions]
    fit_curve = retrieval_curve(scores, thresholds, fractions, lm, final, fit_nb.segments,
                                meta.get("split") or "fit")
    predictor.meta["fit_searched"] = {f"{f:g}": float(s) for f, s in zip(fractions, fit_curve.searched)}
    held = None
    if held_out_nb is not None:
        h_lm = np.array(held_out_nb.lm_log_probs, dtype=np.float32)
        h_final = interpolated(h_lm, held_out_knn, lmbda)
        h_scores = predictor.score(np.asarray(held_out_nb.lm_features, dtype=np.float32))
        held = retrieval_curve(h_scores, thresholds, fractions, h_lm, h_final, held_out_nb.segments,
                               held_out_nb.meta.get("split") or "held-out")
    return RetrievalReport(predictor, fit_curve, held, dict(setting))
