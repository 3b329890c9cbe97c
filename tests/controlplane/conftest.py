"""The conformance fixture: each `ControlPlane` implementation in turn (see `conformance`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from controlplane.conformance import IMPLEMENTATIONS, LEASE_POLICY, STATUS_POLICY, ConformanceTarget

from supervisor.testing import ManualClock


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
async def control_plane(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ConformanceTarget]:
    """Each `ControlPlane` implementation in turn, over a fresh store and a manual clock."""
    name: str = request.param
    clock = ManualClock()
    async with IMPLEMENTATIONS[name](tmp_path, clock, LEASE_POLICY, STATUS_POLICY) as (cp, store):
        yield ConformanceTarget(cp=cp, clock=clock, implementation=name, store=store)
