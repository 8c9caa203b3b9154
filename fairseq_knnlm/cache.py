"""Documented import path kept for users' code: the continuous cache lives in ``scoring.cache``."""

from .scoring.cache import ContinuousCache, cache_log_probs, interpolate_cache  # noqa: F401
