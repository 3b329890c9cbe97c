"""The worker status machine of DESIGN.md section 4, as pure functions.

The control plane never runs a background task to age worker records: every
read re-evaluates a record against the clock, and every presence report is
evaluated against the record it updates. Keeping that logic free of I/O and of
any clock of its own lets the store, the reference server and the tests share
one definition, and lets a property test compare it with the table directly.

The table, with the decisions the design leaves open written down:

=========================  ===============================================================
from -> to                 when
=========================  ===============================================================
(new) -> provisioning      registered, no heartbeat yet
provisioning -> online     first heartbeat (an unhealthy first heartbeat gives ``degraded``)
provisioning -> failed     no heartbeat ``provision_timeout`` seconds after registration
online -> degraded         heartbeat with ``runtime_state == "wedged"`` or
                           ``error_rate >= degrade_error_rate``
degraded -> online         heartbeat with ``error_rate < recover_error_rate`` and no
                           ``runtime_state``; in between, each status keeps itself
online/degraded -> offline ``offline_after`` seconds without a heartbeat, seen on any read
offline -> online          a heartbeat, judged afresh (``degraded`` when unhealthy); the
                           status held before going offline is not remembered
failed -> online           a late heartbeat, judged afresh: a worker that beats is alive
any -> removed             deregistered; terminal
=========================  ===============================================================

Boundaries are inclusive on the "bad" side: exactly ``offline_after`` seconds
of silence is offline, exactly ``degrade_error_rate`` is degraded, exactly
``recover_error_rate`` is not yet recovered.
"""

from __future__ import annotations

import math

import attrs

from ._models import PresenceReport, WorkerRecord, WorkerStatus

__all__ = [
    "WEDGED",
    "Health",
    "StatusPolicy",
    "evaluate",
    "new_worker",
    "next_status",
]

#: The ``runtime_state`` a wedged worker reports (DESIGN §3.5).
WEDGED = "wedged"


def _finite_positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a finite number > 0, got {value!r}")


def _rate(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ValueError(f"{attribute.name} must be between 0 and 1, got {value!r}")


@attrs.frozen
class StatusPolicy:
    """The thresholds of the status table.

    Attributes:
        provision_timeout: seconds a registered worker may take to send its first heartbeat.
        offline_after: seconds without a heartbeat before a worker counts as offline; three
            missed presence beats at the default 30 s interval.
        degrade_error_rate: an error rate at or above this degrades an online worker.
        recover_error_rate: a degraded worker recovers only below this rate; the gap between
            the two rates is a hysteresis band so a worker hovering around one threshold does
            not flap.
    """

    provision_timeout: float = attrs.field(default=300.0, validator=_finite_positive)
    offline_after: float = attrs.field(default=90.0, validator=_finite_positive)
    degrade_error_rate: float = attrs.field(default=0.5, validator=_rate)
    recover_error_rate: float = attrs.field(default=0.1, validator=_rate)

    def __attrs_post_init__(self) -> None:
        if self.recover_error_rate > self.degrade_error_rate:
            raise ValueError(
                "recover_error_rate must not exceed degrade_error_rate "
                f"({self.recover_error_rate} > {self.degrade_error_rate})"
            )


@attrs.frozen
class Health:
    """The two fields of a presence report that the status table looks at."""

    error_rate: float = 0.0
    runtime_state: str | None = None

    @classmethod
    def of(cls, report: PresenceReport) -> Health:
        return cls(error_rate=report.error_rate, runtime_state=report.runtime_state)


def _after_silence(
    current: WorkerStatus,
    *,
    now: float,
    registered_at: float,
    last_heartbeat_at: float | None,
    policy: StatusPolicy,
) -> WorkerStatus:
    if current is WorkerStatus.PROVISIONING:
        if last_heartbeat_at is None and now - registered_at >= policy.provision_timeout:
            return WorkerStatus.FAILED
        return current
    if current in (WorkerStatus.ONLINE, WorkerStatus.DEGRADED):
        since = registered_at if last_heartbeat_at is None else last_heartbeat_at
        if now - since >= policy.offline_after:
            return WorkerStatus.OFFLINE
    return current


def _after_heartbeat(current: WorkerStatus, health: Health, policy: StatusPolicy) -> WorkerStatus:
    unhealthy = health.runtime_state == WEDGED or health.error_rate >= policy.degrade_error_rate
    if current is WorkerStatus.DEGRADED:
        recovered = health.error_rate < policy.recover_error_rate and not health.runtime_state
        return WorkerStatus.ONLINE if recovered else WorkerStatus.DEGRADED
    # online, and the statuses a heartbeat revives (provisioning, offline, failed), are
    # judged the same way: degraded when unhealthy, online otherwise.
    return WorkerStatus.DEGRADED if unhealthy else WorkerStatus.ONLINE


def next_status(
    current: WorkerStatus,
    *,
    now: float,
    registered_at: float,
    last_heartbeat_at: float | None,
    policy: StatusPolicy,
    heartbeat: Health | None = None,
) -> WorkerStatus:
    """The status after time has passed and, optionally, a heartbeat arrived at ``now``.

    The clock is applied first, with the heartbeat time *before* this beat: a
    degraded worker silent for longer than ``offline_after`` goes offline, and
    its heartbeat is then judged afresh rather than against the hysteresis band
    of a status it no longer had.

    Args:
        current: the stored status.
        now: the evaluation time (POSIX seconds).
        registered_at: when the worker registered.
        last_heartbeat_at: the previous heartbeat, ``None`` if there was none.
        policy: the thresholds.
        heartbeat: the health fields of a heartbeat received at ``now``, if any.

    Returns:
        The new status; ``removed`` always stays ``removed``.
    """
    if current is WorkerStatus.REMOVED:
        return current
    status = _after_silence(
        current,
        now=now,
        registered_at=registered_at,
        last_heartbeat_at=last_heartbeat_at,
        policy=policy,
    )
    if heartbeat is None:
        return status
    return _after_heartbeat(status, heartbeat, policy)


def new_worker(
    worker_id: str,
    environment_id: str,
    *,
    now: float,
    metadata: dict[str, object] | None = None,
) -> WorkerRecord:
    """The record of a freshly registered worker: ``provisioning``, no heartbeat yet."""
    return WorkerRecord(
        worker_id=worker_id,
        environment_id=environment_id,
        status=WorkerStatus.PROVISIONING,
        registered_at=float(now),
        runtime_metadata=metadata or {},
    )


def evaluate(
    record: WorkerRecord,
    *,
    now: float,
    policy: StatusPolicy,
    report: PresenceReport | None = None,
) -> WorkerRecord:
    """Re-evaluate ``record`` at ``now``, applying ``report`` if a heartbeat arrived.

    A report replaces every §3.6 field of the record and sets the heartbeat
    time to ``now``; without a report only the status can change (offline,
    failed). A removed record is returned unchanged, report or not: refusing the
    heartbeat is the caller's business (the store answers 410).

    Returns:
        The updated record (``record`` itself when nothing changed).
    """
    if record.status is WorkerStatus.REMOVED:
        return record
    registered_at = record.registered_at if record.registered_at is not None else now
    status = next_status(
        record.status,
        now=now,
        registered_at=registered_at,
        last_heartbeat_at=record.last_heartbeat_at,
        policy=policy,
        heartbeat=Health.of(report) if report is not None else None,
    )
    if report is None:
        return record if status is record.status else attrs.evolve(record, status=status)
    return attrs.evolve(
        record,
        status=status,
        last_heartbeat_at=float(now),
        error_rate=float(report.error_rate),
        sample_error=report.sample_error,
        active_tasks=report.active_tasks,
        current_task=report.current_task,
        uptime_seconds=report.uptime_seconds,
        runtime_state=report.runtime_state,
        runtime_metadata=report.runtime_metadata,
    )
