"""Adaptive retrieval (He et al., 2021): search only for the tokens retrieval helps.

Before any search, the LM's own distribution at a position says how sure the
LM is (:func:`lm_features`: entropy, largest log-probability, the gap to the
second).  A :class:`RetrievalPredictor`, fit offline on saved neighbours of a
held-out split (``fairseq-knnlm-sweep --save-predictor``), turns those
features into a score that estimates how much retrieval raises the target's
log-probability; per token, the kNN-LM searches only when the score reaches
the threshold of the chosen retrieval fraction.  Skipped tokens keep the LM's
log-probability unchanged.

Scores are computed in float64 with one fixed order of elementwise operations
(no BLAS reductions), so a token gets bit-identical scores offline and in
fairseq-eval-lm, whatever the batch: the sweep's perplexity at a fraction is
the one eval-lm prints with that fraction.
"""

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..storage.files import write_json_atomic
from ..errors import UserError
from .base import Batch, Selector

FEATURE_NAMES = ("lm_entropy", "lm_max_log_prob", "lm_top2_gap")
FEATURE_HELP = {
    "lm_entropy": "entropy of the LM's next-token distribution (nats)",
    "lm_max_log_prob": "the LM's largest next-token log-probability",
    "lm_top2_gap": "log-probability gap between the LM's two most likely tokens",
}
KIND = "knnlm-retrieval-predictor"
FORMAT_VERSION = 1
MODEL = "least_squares_quadratic"
# The run identity a predictor is tied to: another model, dictionary, datastore
# or key type is refused (features and gains would mean something else).
IDENTITY_FIELDS = ("checkpoint_sha256", "dictionary_md5", "dstore_fingerprint", "dstore_size", "keytype")
IDENTITY_FIX = {
    "checkpoint_sha256": "model (--path)",
    "dictionary_md5": "dictionary",
    "dstore_fingerprint": "datastore (--dstore)",
    "dstore_size": "datastore size",
    "keytype": "key type (--knn-keytype)",
}


class RetrievalPredictorError(UserError):
    """A predictor file that cannot be used as asked; the message says what to do."""


# ------------------------------------------------------------------ features
def lm_features(lprobs: torch.Tensor) -> torch.Tensor:
    """(n, V) natural-log LM distribution -> (n, len(FEATURE_NAMES)) float32 features.

    Nothing here looks at the target; every row is computed on its own.
    """
    lprobs = lprobs.float()
    top2 = lprobs.topk(min(2, lprobs.size(-1)), dim=-1).values
    second = top2[:, 1] if top2.size(1) > 1 else top2[:, 0]
    # -Σ p log p; clamping -inf log-probs (p = 0) keeps 0 · -inf from becoming NaN
    entropy = -(lprobs.exp() * lprobs.clamp(min=torch.finfo(lprobs.dtype).min)).sum(dim=-1)
    return torch.stack([entropy, top2[:, 0], top2[:, 0] - second], dim=1)


# ----------------------------------------------------------------- the model
def _expanded(z: np.ndarray) -> List[np.ndarray]:
    """Columns of the model: each standardised feature, then every product of two."""
    cols = [z[:, j] for j in range(z.shape[1])]
    cols += [z[:, i] * z[:, j] for i in range(z.shape[1]) for j in range(i, z.shape[1])]
    return cols


@dataclass
class RetrievalPredictor:
    """score = bias + Σ weights · [z, z_i z_j], z = (features - mean) / scale, in float64."""

    feature_names: List[str]
    mean: np.ndarray                 # (F,)
    scale: np.ndarray                # (F,)
    weights: np.ndarray              # (F + F(F+1)/2,)
    bias: float
    thresholds: Dict[float, float] = field(default_factory=dict)  # retrieval fraction -> score threshold
    meta: Dict = field(default_factory=dict)
    path: Optional[str] = None

    def score(self, features) -> np.ndarray:
        """(n, F) features -> (n,) float64 scores; higher means retrieval helps more."""
        x = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise RetrievalPredictorError(
                f"the predictor takes {len(self.feature_names)} features per token, got {x.shape}")
        z = (x.astype(np.float64) - self.mean) / self.scale
        out = np.full(len(x), float(self.bias))
        for w, col in zip(self.weights, _expanded(z)):  # fixed order: the same bits for any batch
            out += w * col
        return np.where(np.isnan(out), np.inf, out)  # unsure: search

    def threshold(self, fraction: float) -> float:
        fraction = float(fraction)
        if fraction not in self.thresholds:
            known = ", ".join(f"{f:g}" for f in sorted(self.thresholds))
            raise RetrievalPredictorError(
                f"{self.path or 'the predictor'} holds thresholds for retrieval fractions {known}, not "
                f"{fraction:g}; pick one of those, pass --knn-retrieval-threshold, or rerun "
                "fairseq-knnlm-sweep --save-predictor with --retrieval-fractions including it")
        return self.thresholds[fraction]

    @staticmethod
    def select(scores: np.ndarray, threshold: float) -> np.ndarray:
        """Which tokens to search: score >= threshold (-inf: all, +inf: none)."""
        if threshold == -math.inf:
            return np.ones(len(scores), dtype=bool)
        if threshold == math.inf:
            return np.zeros(len(scores), dtype=bool)
        return scores >= threshold

    # ------------------------------------------------------------ the file
    def to_json(self) -> dict:
        return dict(
            kind=KIND, format_version=FORMAT_VERSION, model=MODEL,
            feature_names=list(self.feature_names), mean=self.mean.tolist(), scale=self.scale.tolist(),
            weights=self.weights.tolist(), bias=float(self.bias),
            thresholds=[[float(f), float(t)] for f, t in sorted(self.thresholds.items())],
            meta=self.meta,
        )

    def save(self, path: str) -> str:
        """Write atomically (a temporary file renamed into place)."""
        path = os.path.abspath(path)
        directory = os.path.dirname(path)
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise RetrievalPredictorError(f"cannot write the predictor to {path}; pass a writable path")
        write_json_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str) -> "RetrievalPredictor":
        redo = "write it with fairseq-knnlm-sweep --save-predictor"
        try:
            with open(path) as f:
                obj = json.load(f)
        except OSError as e:
            raise RetrievalPredictorError(f"cannot read retrieval predictor {path} ({e.strerror}); {redo}") from None
        except ValueError as e:
            raise RetrievalPredictorError(f"{path} is not a retrieval predictor ({e}); {redo}") from None
        if not isinstance(obj, dict) or obj.get("kind") != KIND:
            raise RetrievalPredictorError(f"{path} is not a retrieval predictor; {redo}")
        if obj.get("format_version") != FORMAT_VERSION or obj.get("model") != MODEL:
            raise RetrievalPredictorError(
                f"{path} is predictor format {obj.get('format_version')} ({obj.get('model')}), this version "
                f"reads {FORMAT_VERSION} ({MODEL}); {redo}")
        try:
            names = [str(n) for n in obj["feature_names"]]
            if names != list(FEATURE_NAMES):
                raise RetrievalPredictorError(
                    f"{path} uses LM features {names}, this version computes {list(FEATURE_NAMES)}; {redo}")
            mean, scale = (np.asarray(obj[k], dtype=np.float64) for k in ("mean", "scale"))
            weights = np.asarray(obj["weights"], dtype=np.float64)
            thresholds = {float(f): float(t) for f, t in obj["thresholds"]}
            bias, meta = float(obj["bias"]), dict(obj["meta"])
        except RetrievalPredictorError:
            raise
        except (KeyError, TypeError, ValueError):
            raise RetrievalPredictorError(f"{path} is an incomplete retrieval predictor; {redo}") from None
        n = len(names)
        if mean.shape != (n,) or scale.shape != (n,) or weights.shape != (n + n * (n + 1) // 2,):
            raise RetrievalPredictorError(f"{path} has weights of the wrong shape; {redo}")
        if not (np.isfinite(mean).all() and np.isfinite(weights).all() and math.isfinite(bias)
                and np.isfinite(scale).all() and (scale > 0).all()):
            raise RetrievalPredictorError(f"{path} has non-finite weights or a scale that is not positive; {redo}")
        if any(not 0.0 <= f <= 1.0 or math.isnan(t) for f, t in thresholds.items()):
            raise RetrievalPredictorError(
                f"{path} has thresholds for fractions outside [0, 1] or NaN thresholds; {redo}")
        return cls(names, mean, scale, weights, bias, thresholds, meta, os.path.abspath(path))

    def check_run(self, run: dict) -> None:
        """Refuse, in one line, a run with another model, dictionary, datastore or key type."""
        for key in IDENTITY_FIELDS:
            mine, theirs = self.meta.get(key), run.get(key)
            if mine is not None and theirs is not None and str(mine) != str(theirs):
                raise RetrievalPredictorError(
                    f"--knn-retrieval-predictor {self.path} was fit for another {IDENTITY_FIX[key]} "
                    f"({key} {mine} vs {theirs}); fit one on neighbours saved with this run's "
                    "model, datastore and --knn-keytype")

    def describe(self) -> str:
        m = self.meta
        return (f"fit on {m.get('fit_split', '?')} at k {m.get('k')}, T {m.get('knn_temp')}, "
                f"λ {m.get('lmbda')}, sim func {m.get('sim_func')}")


def fit_predictor(features: np.ndarray, gain: np.ndarray, feature_names: Sequence[str] = FEATURE_NAMES,
                  ridge: float = 1e-6) -> RetrievalPredictor:
    """Least squares of the per-token gain on standardised features and their pairwise
    products (a quadratic model: closed form, deterministic, no training settings)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(gain, dtype=np.float64)
    ok = np.isfinite(x).all(axis=1) & ~np.isnan(y)
    if ok.sum() < 2:
        raise RetrievalPredictorError("adaptive retrieval needs at least two scored tokens to fit on")
    x, y = x[ok], y[ok]
    finite = np.isfinite(y)
    # A -inf gain (λ = 1, no neighbour predicts the target) counts as the worst finite one.
    y = np.where(finite, y, y[finite].min(initial=0.0))
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    design = np.column_stack([np.ones(len(x))] + _expanded((x - mean) / scale))
    gram = design.T @ design
    gram[np.diag_indices_from(gram)] += ridge * len(x)
    coef = np.linalg.solve(gram, design.T @ y)
    return RetrievalPredictor(list(feature_names), mean, scale, coef[1:], float(coef[0]))


def fraction_thresholds(scores: np.ndarray, fractions: Sequence[float]) -> Dict[float, float]:
    """Per retrieval fraction f, the score threshold that searches the top ⌈f·n⌉ tokens of
    ``scores`` (ties at the threshold are all searched).  f = 1 gives -inf (search all),
    f = 0 gives +inf (search none)."""
    ranked = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    out = {}
    for f in fractions:
        f = float(f)
        if not 0.0 <= f <= 1.0:
            raise RetrievalPredictorError(f"retrieval fractions must lie in [0, 1], got {f:g}")
        m = int(math.ceil(f * len(ranked) - 1e-9))
        if f >= 1.0 or m >= len(ranked):
            out[f] = -math.inf
        elif m <= 0:
            out[f] = math.inf
        else:
            out[f] = float(ranked[m - 1])
    return out


# ------------------------------------------------------------ the pipeline's stage
class PredictedRows(Selector):
    """--knn-retrieval-predictor as the pipeline's selector: the rows whose score reaches
    ``threshold``, from the batch's LM features (or, in generation, from its LM distribution)."""

    def __init__(self, predictor: RetrievalPredictor, threshold: float):
        self.predictor = predictor
        self.threshold = threshold

    def select(self, batch: Batch) -> np.ndarray:
        features = batch.lm_features if batch.lm_features is not None else lm_features(batch.lm_lp)
        return self.predictor.select(self.predictor.score(features), self.threshold)


# ------------------------------------------------------------ the run's flags
def load_for_run(args, identity: dict, log=None):
    """(predictor, score threshold) for --knn-retrieval-predictor, checked against the run.

    ``identity`` holds the run's IDENTITY_FIELDS; a mismatch is refused.  Another
    k, temperature, λ or similarity only changes what the thresholds were tuned for,
    so it is logged, not refused.
    """
    predictor = RetrievalPredictor.load(args.knn_retrieval_predictor)
    predictor.check_run(identity)
    if args.knn_retrieval_threshold is not None:
        threshold = float(args.knn_retrieval_threshold)
    else:
        threshold = predictor.threshold(args.knn_retrieval_fraction)
    m = predictor.meta
    tuned = dict(k=args.k, knn_temp=args.knn_temp, lmbda=args.lmbda, sim_func=str(args.knn_sim_func))
    differ = [f"{key} {m.get(key)} (now {value})" for key, value in tuned.items()
              if m.get(key) is not None and str(m.get(key)) != str(value)]
    if log is not None:
        if differ:
            log.warning(f"--knn-retrieval-predictor was fit at {', '.join(differ)}; its thresholds "
                        "were chosen for those settings")
        log.info(f"adaptive retrieval: {predictor.path} ({predictor.describe()}), score threshold {threshold:.6g}")
    return predictor, threshold
