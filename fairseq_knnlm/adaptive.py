"""Documented import path kept for users' code: adaptive retrieval lives in ``retrieval.adaptive``."""

from .retrieval.adaptive import RetrievalPredictor, fit_predictor, lm_features  # noqa: F401
