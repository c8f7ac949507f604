"""Shared test configuration.

Hypothesis runs derandomized, so a CI run is reproducible: the same examples
every time, and a failure found once is found again.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "book",
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "book"))
