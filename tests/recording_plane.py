"""An embedded control plane that remembers the session credentials it hands out.

For tests that prove a credential never reaches a log, a status page or a snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence

from supervisor.controlplane import EmbeddedControlPlane, WorkItem
from supervisor.controlplane._protocol import LeasedClaim


class RecordingPlane(EmbeddedControlPlane):
    """The embedded control plane, remembering the session credentials it hands out."""

    secrets: list[str]

    async def poll(
        self,
        *,
        worker_id: str | None = None,
        block_ms: int = 0,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> WorkItem | None:
        item = await super().poll(
            worker_id=worker_id,
            block_ms=block_ms,
            reclaim_older_than_ms=reclaim_older_than_ms,
            labels=labels,
        )
        if item is not None and item.secret:
            self.secrets.append(item.secret)
        return item

    async def claim(
        self,
        *,
        worker_id: str,
        limit: int,
        block_ms: int = 0,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[WorkItem]:
        items = await super().claim(
            worker_id=worker_id,
            limit=limit,
            block_ms=block_ms,
            reclaim_older_than_ms=reclaim_older_than_ms,
            labels=labels,
        )
        self.secrets += [item.secret for item in items if item.secret]
        return items

    async def claim_leased(
        self,
        *,
        worker_id: str,
        limit: int,
        block_ms: int = 0,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
        desired_ttl_seconds: float | None = None,
    ) -> list[LeasedClaim]:
        claims = await super().claim_leased(
            worker_id=worker_id,
            limit=limit,
            block_ms=block_ms,
            reclaim_older_than_ms=reclaim_older_than_ms,
            labels=labels,
            desired_ttl_seconds=desired_ttl_seconds,
        )
        self.secrets += [claim.item.secret for claim in claims if claim.item.secret]
        return claims
