"""Workers: registration, presence reports, and the status machine evaluated on every read."""

from __future__ import annotations

import json
from collections.abc import Mapping

import attrs

from .._exceptions import Gone, NotFound
from .._models import PresenceReport, WorkerRecord, WorkerStatus
from .._status import evaluate, new_worker
from ._common import Row, check_id, check_report, json_object, worker_from_row
from ._core import StoreCore
from ._sql import Transaction


class WorkerRecords(StoreCore):
    """The worker half of the store contract (the status rules live in `_status`)."""

    @staticmethod
    def _worker_row(tx: Transaction, environment_id: str, worker_id: str) -> Row | None:
        return tx.one(
            "SELECT * FROM workers WHERE environment_id = ? AND worker_id = ?{for_update}",
            (environment_id, worker_id),
        )

    def _known_worker_row(self, tx: Transaction, environment_id: str, worker_id: str) -> Row:
        row = self._worker_row(tx, environment_id, worker_id)
        if row is None:
            raise NotFound(f"no worker {worker_id!r} in environment {environment_id!r}")
        return row

    @staticmethod
    def _save_worker(tx: Transaction, record: WorkerRecord) -> None:
        tx.execute(
            "INSERT INTO workers (environment_id, worker_id, status, registered_at, "
            "last_heartbeat_at, error_rate, sample_error, active_tasks, current_task, "
            "uptime_seconds, runtime_state, runtime_metadata) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (environment_id, worker_id) DO UPDATE SET "
            "status = excluded.status, registered_at = excluded.registered_at, "
            "last_heartbeat_at = excluded.last_heartbeat_at, error_rate = excluded.error_rate, "
            "sample_error = excluded.sample_error, active_tasks = excluded.active_tasks, "
            "current_task = excluded.current_task, uptime_seconds = excluded.uptime_seconds, "
            "runtime_state = excluded.runtime_state, "
            "runtime_metadata = excluded.runtime_metadata",
            (
                record.environment_id,
                record.worker_id,
                record.status.value,
                record.registered_at,
                record.last_heartbeat_at,
                record.error_rate,
                record.sample_error,
                record.active_tasks,
                record.current_task,
                record.uptime_seconds,
                record.runtime_state,
                json_object("runtime_metadata", record.runtime_metadata),
            ),
        )

    def _evaluated_worker(self, tx: Transaction, row: Row) -> WorkerRecord:
        record = worker_from_row(row)
        updated = evaluate(record, now=tx.now, policy=self.status_policy)
        if updated is not record:
            tx.execute(
                "UPDATE workers SET status = ? WHERE environment_id = ? AND worker_id = ?",
                (updated.status.value, updated.environment_id, updated.worker_id),
            )
        return updated

    def register_worker(
        self,
        environment_id: str,
        worker_id: str,
        *,
        now: float,
        metadata: Mapping[str, object] | None = None,
    ) -> WorkerRecord:
        """Register a worker (``provisioning``), or refresh a known one's metadata.

        A known worker keeps its evaluated status, except that a ``failed``
        one (it never beat in time) starts provisioning again.

        Raises:
            Gone: the worker was deregistered; removal is terminal.
        """
        check_id("environment_id", environment_id)
        check_id("worker_id", worker_id)
        meta = json.loads(json_object("metadata", metadata))
        with self._transaction("registering a worker", now) as tx:
            self._ensure_environment(tx, environment_id)
            row = self._worker_row(tx, environment_id, worker_id)
            if row is None:
                record = new_worker(worker_id, environment_id, now=tx.now, metadata=meta)
            else:
                record = self._evaluated_worker(tx, row)
                if record.status is WorkerStatus.REMOVED:
                    raise Gone(f"worker {worker_id!r} was deregistered")
                if record.status is WorkerStatus.FAILED:
                    record = new_worker(worker_id, environment_id, now=tx.now, metadata=meta)
                elif metadata is not None:
                    record = attrs.evolve(record, runtime_metadata=meta)
            self._save_worker(tx, record)
            return record

    def worker_heartbeat(
        self, environment_id: str, report: PresenceReport, *, now: float
    ) -> WorkerRecord:
        """Store a presence report and return the worker's evaluated record.

        A worker not seen before is registered by its first heartbeat.

        Raises:
            BadRequest: a malformed report.
            Gone: the worker was deregistered.
        """
        check_id("environment_id", environment_id)
        check_report(report)
        json_object("runtime_metadata", report.runtime_metadata)
        with self._transaction("recording worker presence", now) as tx:
            self._ensure_environment(tx, environment_id)
            row = self._worker_row(tx, environment_id, report.worker_id)
            if row is None:
                record = new_worker(report.worker_id, environment_id, now=tx.now)
            else:
                record = worker_from_row(row)
                if record.status is WorkerStatus.REMOVED:
                    raise Gone(f"worker {report.worker_id!r} was deregistered")
            record = evaluate(record, now=tx.now, policy=self.status_policy, report=report)
            self._save_worker(tx, record)
            return record

    def get_worker(self, environment_id: str, worker_id: str, *, now: float) -> WorkerRecord:
        """A worker's record, its status evaluated at ``now``.

        Raises:
            NotFound: unknown worker.
        """
        check_id("environment_id", environment_id)
        with self._transaction("reading a worker", now) as tx:
            row = self._known_worker_row(tx, environment_id, worker_id)
            return self._evaluated_worker(tx, row)

    def list_workers(self, environment_id: str, *, now: float) -> list[WorkerRecord]:
        """Every worker of the environment (removed ones included), in registration order."""
        check_id("environment_id", environment_id)
        with self._transaction("listing workers", now) as tx:
            rows = tx.execute(
                "SELECT * FROM workers WHERE environment_id = ? ORDER BY registered_at, rowid",
                (environment_id,),
            ).fetchall()
            return [self._evaluated_worker(tx, row) for row in rows]

    def deregister_worker(self, environment_id: str, worker_id: str, *, now: float) -> WorkerRecord:
        """Mark a worker ``removed`` for good; asking again returns the same record.

        Raises:
            NotFound: unknown worker.
        """
        check_id("environment_id", environment_id)
        with self._transaction("deregistering a worker", now) as tx:
            row = self._known_worker_row(tx, environment_id, worker_id)
            record = attrs.evolve(worker_from_row(row), status=WorkerStatus.REMOVED)
            self._save_worker(tx, record)
            return record
