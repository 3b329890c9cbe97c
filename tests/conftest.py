"""Shared test configuration.

``trio_mode`` (pyproject) makes every ``async def`` test a Trio test; use the
``autojump_clock`` fixture for anything timed.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI machines are small and noisy: no deadlines, and a fixed modest budget.
settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
