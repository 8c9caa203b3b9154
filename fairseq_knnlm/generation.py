"""Documented import path kept for users' code: generation lives in ``integration.generation``,
the hub in ``integration.hub``."""

from .integration.generation import attach_knnlm, detach_knnlm  # noqa: F401
from .integration.hub import from_pretrained, knnlm_task_overrides  # noqa: F401
