"""The worker: the domain tree built from the generic supervision tree.

::

    worker                 ONE_FOR_ONE
    ├─ services            ONE_FOR_ONE   (presence, delegations, local API: never touch sessions)
    └─ work                REST_FOR_ONE
       ├─ sessions         dynamic, TEMPORARY children, parallel_stop, at most max_concurrency
       │  └─ session:<id>  see supervisor._session
       └─ poller           claims work only when a session slot is free

Properties kept from DESIGN §3.1: a failure under ``services`` never touches
running sessions (ONE_FOR_ONE at the top); a lease loss or wedge cancels
exactly one session (each session is its own supervisor); a crash of
``sessions`` restarts the poller too (REST_FOR_ONE), so no claim is made into
a sessions supervisor that is not there.

Only the tree's public API is used here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from functools import partial
from typing import Any

import trio

from .._base._exceptions import ConfigError
from .._base._groups import collapse_group, raise_saving_context
from .._base._lane import Offload, ThreadLane
from .._base._logging import redact_secret
from .._tree._events import SupervisorSnapshot
from .._tree._exceptions import ChildStartError
from .._tree._spec import Backoff, ChildSpec, Strategy, SupervisorSpec
from .._tree._supervisor import Supervisor
from ..controlplane._embedded import EmbeddedControlPlane
from ..controlplane._exceptions import BadRequest, ControlPlaneError
from ..controlplane._models import Outcome, OutcomeStatus, RetryPolicy, WorkItem, WorkState
from ..controlplane._protocol import ControlPlane
from ..controlplane._retention import run_retention_sweep
from ..controlplane._session_client import SessionCredentials, session_location
from ._agent import AgentFunction, AgentRunner, AgentSpec, EnvPolicy
from ._config import WorkerConfig
from ._delegations import DelegationWatcher
from ._journal import journal_path
from ._lease import REQUEUE_OUTCOMES, KeeperOptions
from ._metrics import HeartbeatMeter, WorkerStats, timed_control_plane
from ._poller import Poller, Slot
from ._presence import Activity, Presence, RequestCounter, counting_control_plane, default_version
from ._reaper import Reaper
from ._session import SessionRecord, SessionRunner, Workspaces
from ._wedge import WedgeBreaker, WedgeDetector, WedgeState
from ._workspace import WorkspaceManager

__all__ = ["Offload", "Worker", "WorkerStats", "open_worker"]

logger = logging.getLogger("supervisor.worker")

#: The longest a lease keeper retries a claim's first heartbeat (its own default).
_FIRST_BEAT_LIMIT = 30.0
#: The longest an ack may take before the poller abandons the claim.
_ACK_LIMIT = 10.0
#: Finished sessions whose records the worker keeps (for ``wait``, status, metrics).
_FINISHED_KEPT = 1000
#: Finished records pruned at once when ``_FINISHED_KEPT`` is exceeded by this many.
_FORGET_BATCH = 100


class _Relay:
    """Passes a child's readiness on to the caller of ``Worker.run`` with the worker."""

    def __init__(self, inner: trio.TaskStatus[Worker], worker: Worker) -> None:
        self._inner = inner
        self._worker = worker

    def started(self, value: object = None) -> None:
        self._inner.started(self._worker)


class Worker:
    """A worker process's heart: claims work, keeps leases, runs agents.

    ``await nursery.start(worker.run)`` returns once the tree is up (or use
    :func:`open_worker`). Cancelling ``run()`` stops every session at once with
    outcome ``cancelled`` (reported to the control plane), then returns;
    :meth:`drain` lets running sessions finish first.

    Args:
        config: the settings.
        control_plane: use this control plane instead of the one ``config``
            names (tests, simulations, embedding). It is not closed by the worker.
        agent: an agent to use instead of ``config.agent`` (an async callable,
            or an :class:`AgentSpec`).
        base_env: the environment agents' allowlist reads from (default ``os.environ``).
        keeper_options: keyword arguments for every ``LeaseKeeper`` (timing, rng).
        rng: randomness for poll pauses and jitter.
        workspaces: makes the sessions' workspaces instead of the
            `WorkspaceManager` that ``config`` describes (a simulation passes
            `supervisor.testing.MemoryWorkspaces`, which touches neither the
            file system nor worker threads).
        offload: runs the short blocking calls of each session (its journal
            entry's fsync, its log file, an empty workspace directory) away from
            the event loop; by default a `~supervisor._lane.ThreadLane` the
            worker owns while it runs. A simulation under ``MockClock`` passes
            one that calls inline: a task waiting on a thread lets the mock
            clock jump.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        control_plane: ControlPlane | None = None,
        agent: AgentFunction | AgentSpec | None = None,
        base_env: Mapping[str, str] | None = None,
        keeper_options: KeeperOptions | None = None,
        rng: random.Random | None = None,
        workspaces: Workspaces | None = None,
        offload: Offload | None = None,
    ) -> None:
        if not isinstance(config, WorkerConfig):
            raise TypeError(f"Worker needs a WorkerConfig, got {config!r}")
        self.config = config
        if agent is None:
            self.agent_spec = AgentSpec.from_setting(config.agent)
        elif isinstance(agent, AgentSpec):
            self.agent_spec = agent
        else:
            self.agent_spec = AgentSpec.from_callable(agent)
        self._given_control_plane = control_plane
        self._base_env = base_env
        self._keeper_options = KeeperOptions(**(keeper_options or {}))
        self._rng = rng if rng is not None else random.Random()
        self._given_workspaces = workspaces
        self._workspace_manager: WorkspaceManager | None = None
        self._reaper: Reaper | None = None
        self._given_offload = offload
        self._offload: Offload = offload if offload is not None else trio.to_thread.run_sync
        #: Session log writes go here (the worker's own lane, when it made one).
        self._log_writer: Callable[[Callable[[], object]], None] | None = None
        #: Starts agent processes (the worker's own lane, when it made one).
        self._spawner: Offload | None = None
        self._running = False
        self._draining = False
        self._tree: Supervisor | None = None
        self._work: Supervisor | None = None
        self._sessions: Supervisor | None = None
        self._services: Supervisor | None = None
        self._runner: SessionRunner | None = None
        self._control_plane: ControlPlane | None = None
        self._session_ended = trio.Event()
        self._started_sessions = 0
        self._outcomes: Counter[str] = Counter()
        self._service_specs: list[ChildSpec] = []
        #: Whether this worker's agent runtime is wedged (detectors mark it, presence reports it).
        self.wedge = WedgeState()
        #: Marks ``wedge`` and cancels a session whose output or silence says it is wedged.
        self.wedge_detector = WedgeDetector(
            self.wedge, patterns=config.wedge_patterns, timeout=config.wedge_timeout
        )
        #: The poller's circuit breaker: while wedged, one probe claim per probe_interval.
        self.breaker = WedgeBreaker(self.wedge, probe_interval=config.probe_interval)
        #: Control-plane requests and errors since the last accepted presence report.
        self.requests = RequestCounter()
        #: Builds each presence report's ``runtime_metadata``; replace it to report more.
        #: It may fail: the report then goes out without metadata.
        self.metadata_provider: Callable[[], Mapping[str, Any]] = self.runtime_metadata
        #: The presence loop while the worker runs.
        self.presence: Presence | None = None
        #: Latency and failures of the lease heartbeats (for metrics).
        self.heartbeat_meter = HeartbeatMeter()
        #: The local API's base URL while it serves (``config.api_enabled``), else ``None``.
        self.api_url: str | None = None
        self._forget_secrets: dict[str, Callable[[], None]] = {}
        #: The delegation watcher (a ``services`` child) once the tree is built.
        self.delegations: DelegationWatcher | None = None

    # ------------------------------------------------------------ properties

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    @property
    def control_plane(self) -> ControlPlane:
        """The control plane in use (while running)."""
        if self._control_plane is None:
            raise RuntimeError("the worker is not running")
        return self._control_plane

    @property
    def running(self) -> bool:
        return self._running

    def add_service(self, spec: ChildSpec) -> None:
        """Add a child to ``services`` (presence, delegations, the local API, your own).

        Must be called before :meth:`run`. A service's failures never touch sessions.
        """
        if self._running:
            raise RuntimeError("add services before the worker runs")
        self._service_specs.append(spec)

    # ------------------------------------------------------------------ run

    async def run(self, *, task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled, drained or the tree gives up.

        Raises:
            ConfigError: the state directory or the control plane cannot be used.
            RestartIntensityExceeded: a part of the tree kept failing.
        """
        if self._running:
            raise RuntimeError("this worker is already running")
        self._running = True
        self._draining = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self._given_offload is None:
                    lane = ThreadLane("supervisor-io")
                    stack.push_async_callback(_close_lane, lane)
                    self._offload = lane.run
                    # Agent processes start on the same lane, after their session's
                    # journal line, workspace and log, in the order asked for. A start
                    # waits for the child's exec (under a millisecond, even on a busy
                    # machine), which delays other sessions' log writes by that much
                    # and no more. A lane of its own measured worse: one more thread
                    # taking the GIL and waking the event loop costs every session
                    # more than the wait (see CHANGELOG). In-process agents ignore it.
                    self._spawner = lane.run
                self._prepare_state_dir()
                if self._wants_reaper():
                    reaper = self._reaper = Reaper(grace=self.config.agent_grace)
                    await trio.to_thread.run_sync(reaper.start)
                    stack.push_async_callback(self._close_reaper)
                plane = self._given_control_plane
                if plane is None:
                    plane = await stack.enter_async_context(self._open_control_plane())
                self._control_plane = plane
                await self._apply_environment_settings(plane)
                tree = self._build_tree(plane)
                manager = self._workspace_manager
                if manager is not None:
                    # After the tree is down, every session's workspace is gone: give up
                    # the run directory. Before it starts: what killed workers left.
                    stack.push_async_callback(manager.aclose)
                    await manager.sweep()
                await self._register(plane)
                await tree.run(task_status=_Relay(task_status, self))
        finally:
            self._running = False
            self._control_plane = None

    async def _apply_environment_settings(self, plane: ControlPlane) -> None:
        """Write the environment policies the configuration gives (queue cap, retention...).

        Only to a plane whose store this worker holds (embedded SQLite, direct
        PostgreSQL); a served plane's policies are its server's (`WorkerConfig`
        refuses them there).
        """
        changes = self.config.environment_settings()
        if not changes:
            return
        if not isinstance(plane, EmbeddedControlPlane):
            raise ConfigError(
                "environment policies need a control plane whose store this worker opens",
                key="max_queue_depth",
            )
        try:
            settings = await plane.configure_environment(**changes)
        except BadRequest as exc:
            raise ConfigError(exc.message) from None
        logger.info("environment %s policies: %s", plane.environment_id, settings)

    def _wants_reaper(self) -> bool:
        """A reaper for subprocess agents, where ``/proc`` lets it find them."""
        return (
            self.config.agent_reaper
            and self.agent_spec.is_process
            and sys.platform.startswith("linux")
            and os.path.isdir("/proc/self")
        )

    async def _close_reaper(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(reaper.close)

    def _prepare_state_dir(self) -> None:
        state = self.config.state_dir
        try:
            for sub in (state, state / "logs"):
                sub.mkdir(parents=True, exist_ok=True)
            probe = state / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"cannot use {str(state)!r} as the state directory: {exc.strerror or exc}",
                key="state_dir",
            ) from None

    def _open_control_plane(self) -> contextlib.AbstractAsyncContextManager[ControlPlane]:
        return self.config.open_control_plane(
            missing_key="a remote control plane needs environment_key or environment_key_file"
        )

    async def _register(self, plane: ControlPlane) -> None:
        metadata = {
            "capacity": self.config.max_concurrency,
            "agent": self.agent_spec.name,
            "workspace": self.config.workspace,
            "pid": os.getpid(),
        }
        try:
            await plane.register_worker(self.worker_id, metadata=metadata)
        except ControlPlaneError as exc:
            # Presence reports register the worker later; claiming does not depend on it.
            logger.warning("could not register worker %s: %s", self.worker_id, exc)

    def _build_tree(self, plane: ControlPlane) -> Supervisor:
        config = self.config
        # The worker's own calls (poller, lease keepers, presence) are counted for the
        # presence report's error rate; calls made through the public API are not.
        counted = counting_control_plane(plane, self.requests)
        state_dir = config.state_dir.absolute()  # agents get paths; their cwd is elsewhere
        workspaces: Workspaces
        if self._given_workspaces is not None:
            workspaces = self._given_workspaces
        else:
            workspaces = self._workspace_manager = WorkspaceManager(
                state_dir,
                offload=self._offload,
                kind=config.workspace,
                base_repo=os.fspath(config.base_repo) if config.base_repo is not None else None,
                keep_workspaces=config.keep_workspaces,
                owner=_owner(config),
            )
        agent = AgentRunner(
            self.agent_spec,
            env_policy=EnvPolicy(extra=config.agent_env),
            session_timeout=config.session_timeout,
            grace=config.agent_grace,
            base_env=self._base_env,
            # A worker owns its agents' whole process trees: adopt orphaned
            # grandchildren so they can be reaped, not left as zombies.
            reap_orphans=True,
            user=config.agent_user,
            group=config.agent_group,
            spawner=self._spawner,
        )
        self._runner = SessionRunner(
            control_plane=timed_control_plane(counted, self.heartbeat_meter),
            agent=agent,
            workspaces=workspaces,
            logs_dir=state_dir / "logs",
            lease_ttl=config.lease_ttl,
            session_env=self._session_env(plane),
            keeper_options=self._lease_keeper_options(),
            on_end=self._on_session_end,
            on_start=self._journal_session,
            offload=self._offload,
            log_writer=self._log_writer,
            on_line=self.wedge_detector.on_line,
            # no silence watchdog task per session unless a wedge_timeout is set
            watchdog=self.wedge_detector.watch if config.wedge_timeout is not None else None,
            reaper=self._reaper,
            log_max_bytes=config.session_log_max_bytes,
        )
        slots = trio.CapacityLimiter(config.max_concurrency)
        sessions = self._sessions = Supervisor(
            SupervisorSpec(
                [],
                name="sessions",
                parallel_stop=True,
                # TEMPORARY children are never restarted; the budget only guards the poller pair.
                intensity=3,
                period=30.0,
            )
        )
        poller = Poller(
            counted,
            worker_id=self.worker_id,
            slots=slots,
            on_claim=self._on_claim,
            block_ms=config.poll_block_ms,
            gate=self.breaker,
            ack_timeout=self._claim_limits()[0],
            rng=self._rng,
            max_batch=config.max_concurrency,
            labels=config.labels,
            # A store in this process grants each first lease in the claim itself.
            claim_leases=True,
            lease_ttl=config.lease_ttl,
        )
        self.wedge_detector.on_wedge = poller.interrupt_poll
        work = self._work = Supervisor(
            SupervisorSpec(
                [ChildSpec("sessions", sessions.run), ChildSpec("poller", poller.run, shutdown=0)],
                strategy=Strategy.REST_FOR_ONE,
                intensity=5,
                period=60.0,
                name="work",
            )
        )
        service_specs = [self._presence_spec(counted), *self._service_specs]
        service_specs.append(self._delegations_spec(plane))
        if isinstance(plane, EmbeddedControlPlane):
            # This worker holds the store: it sweeps what the retention says is old
            # (a no-op for environments without one; idempotent beside other sweepers).
            service_specs.append(
                ChildSpec(
                    "retention",
                    partial(
                        run_retention_sweep,
                        plane.purge_expired,
                        interval=config.retention_sweep_interval,
                    ),
                    shutdown=0,
                    backoff=Backoff(initial=1.0, maximum=60.0),
                )
            )
        if config.api_enabled:
            service_specs.append(self._api_spec())
        services = self._services = Supervisor(
            SupervisorSpec(service_specs, name="services", intensity=10, period=60.0)
        )
        tree = self._tree = Supervisor(
            SupervisorSpec(
                [
                    ChildSpec("services", services.run, shutdown=None),
                    ChildSpec("work", work.run, shutdown=None),
                ],
                name="worker",
                intensity=3,
                period=60.0,
            )
        )
        return tree

    def _lease_keeper_options(self) -> KeeperOptions:
        """``LeaseKeeper`` options: the caller's, over defaults tied to the lease ttl.

        The first heartbeat names no worker, so the control plane fences it by
        the item's state alone: a first beat that arrives after the claim's
        lease ran out (the ack lease, or the lease an earlier unanswered beat
        started) and after another worker acked the item would be taken as that
        worker's, and two workers would serve one item. So a claim must reach
        its first good beat quickly: the ack is bounded by ``_claim_limits``'
        first figure (see ``Poller.ack_timeout``), the first beat's retries by
        the second, and the two together stay under 0.8 x ttl (and 40 s, well
        inside the control plane's default 60 s ack lease). The simulator in
        ``supervisor.testing`` finds the split brain without these bounds.
        """
        options = KeeperOptions(start_timeout=self._claim_limits()[1])
        options.update(self._keeper_options)
        return options

    def _claim_limits(self) -> tuple[float, float]:
        """Seconds an ack may take, and a claim's first heartbeat may keep failing."""
        ttl = self.config.lease_ttl
        return min(_ACK_LIMIT, 0.2 * ttl), min(_FIRST_BEAT_LIMIT, 0.6 * ttl)

    def _session_env(self, plane: ControlPlane) -> Callable[[WorkItem], dict[str, str]] | None:
        """Builds each agent's session variables: its own credential, never the environment key.

        Only for a control plane an agent can reach by itself (the embedded
        store's file, or an HTTP URL); others give their agents no credential.
        """
        location = session_location(plane)
        if location is None:
            return None

        def variables(item: WorkItem) -> dict[str, str]:
            if item.secret is None:
                return {}
            return SessionCredentials(
                session_id=item.data.id,
                token=item.secret,
                control_plane=location,
                environment_id=plane.environment_id,
            ).to_environ()

        return variables

    def _delegations_spec(self, plane: ControlPlane) -> ChildSpec:
        config = self.config
        assert self._runner is not None
        watcher = self.delegations = DelegationWatcher(
            plane,
            worker_id=self.worker_id,
            journal_path=journal_path(config.state_dir.absolute(), self.worker_id),
            sessions=self._runner.session,
            poll_interval=config.delegation_poll_interval,
            cooldown=config.delegation_cooldown,
            lru_size=config.delegation_lru_size,
        )
        # A journal that cannot be written (a full disk) crashes the watcher; the
        # backoff keeps that from spending the services budget at once. It has
        # nothing to finish on a stop (the journal is consistent after every
        # write), so it is cancelled at once.
        return ChildSpec(
            "delegations",
            watcher.run,
            shutdown=0,
            backoff=Backoff(initial=1.0, maximum=60.0),
        )

    def _api_spec(self) -> ChildSpec:
        # The backoff keeps a persistently failing API (say, its fixed port taken
        # by another program after a restart) from spending the services budget:
        # at most about six restarts a minute, under the intensity of ten.
        return ChildSpec(
            "api",
            self._serve_api,
            shutdown=2.0,
            backoff=Backoff(initial=1.0, maximum=60.0),
        )

    async def _serve_api(self, *, task_status: trio.TaskStatus[str]) -> None:
        from ._api import serve_local_api

        def bound(url: str | None) -> None:
            self.api_url = url

        await serve_local_api(
            self,
            host=self.config.api_host,
            port=self.config.api_port,
            api_file=self.config.state_dir / "api.json",
            on_bound=bound,
            task_status=task_status,
        )

    async def _on_claim(self, item: WorkItem, slot: Slot) -> None:
        """Start the session for a claimed, acknowledged item (the poller's hand-over)."""
        assert self._runner is not None and self._sessions is not None
        # The session's credential must never reach a log line, even by accident.
        self._forget_secrets[item.id] = redact_secret(item.secret)
        try:
            await self._sessions.start_child(self._runner.spec_for(item, slot))
        except ChildStartError as exc:
            # The session hands over before its lease is confirmed, so this is a
            # failure to even set it up; it released its slot. The item returns to
            # the queue when its reclaim window or lease runs out.
            logger.warning("session for work item %s did not start: %s", item.id, exc)
        except (ValueError, RuntimeError) as exc:
            slot.release()
            self._forget_secrets.pop(item.id, _no_secret)()
            logger.warning("work item %s not started: %s", item.id, exc)
            return
        self._started_sessions += 1

    async def _journal_session(self, item: WorkItem) -> None:
        """Once a session's lease is confirmed, before its agent starts: its delegation
        results are then recognised as this worker's even after a restart. A file
        write (its fsync is grouped, see `DelegationJournal.record_session`), so it
        goes to the I/O lane: queued, when the workspace is made on that lane after
        it; through ``offload`` otherwise."""
        watcher = self.delegations
        if watcher is None:
            return
        note = partial(_journal_quietly, watcher, item.data.id, item.id)
        if self._log_writer is not None and self._workspace_manager is not None:
            # Queued on the I/O lane without waiting: the session's workspace is made
            # on the same lane after it, so the line is written before the agent starts.
            self._log_writer(note)
            return
        await self._offload(note)

    def _presence_spec(self, plane: ControlPlane) -> ChildSpec:
        presence = self.presence = Presence(
            plane,
            worker_id=self.worker_id,
            counter=self.requests,
            wedge=self.wedge,
            interval=self.config.presence_interval,
            activity=self._activity,
            metadata=lambda: self.metadata_provider(),
        )
        # A report that fails is the loop's business (it retries at the next
        # interval); only a defect ends it, and the backoff keeps a loop that
        # keeps failing from spending the services budget at once.
        return ChildSpec(
            "presence", presence.run, shutdown=0, backoff=Backoff(initial=1.0, maximum=60.0)
        )

    def _activity(self) -> Activity:
        running = [r for r in self.sessions() if not r.done.is_set()]
        active = len(running)
        if self._draining:
            status = "draining"
        elif active >= self.config.max_concurrency:
            status = "busy"
        else:
            status = "working" if active else "idle"
        current = max(running, key=lambda r: r.started_at).work_id if running else None
        return Activity(status=status, active_tasks=active, current_task=current)

    def runtime_metadata(self) -> dict[str, Any]:
        """The default ``runtime_metadata`` of presence reports.

        Capabilities, capacity, routing labels and version, plus the live supervision tree
        (``tree``), so the control plane's dashboard can draw it without
        reaching the worker's local API.
        """
        config = self.config
        try:
            tree: dict[str, Any] | None = self.snapshot().as_dict()
        except RuntimeError:
            tree = None
        return {
            "capabilities": {
                "agent": "process" if self.agent_spec.is_process else "in_process",
                "workspace": config.workspace,
                "wedge_detection": {
                    "patterns": len(config.wedge_patterns),
                    "silence_timeout": config.wedge_timeout,
                },
            },
            "capacity": config.max_concurrency,
            "labels": list(config.labels),
            "version": default_version(),
            "tree": tree,
        }

    def _on_session_end(self, record: SessionRecord) -> None:
        self.breaker.session_ended(
            record.work_id, record.outcome.status if record.outcome is not None else None
        )
        self._forget_secrets.pop(record.work_id, _no_secret)()
        if record.outcome is not None:
            self._outcomes[record.outcome.status.value] += 1
        ended, self._session_ended = self._session_ended, trio.Event()
        ended.set()
        self._forget_old_sessions()

    def _forget_old_sessions(self) -> None:
        """Keep the records of at most ``_FINISHED_KEPT`` finished sessions.

        A worker runs for months; remembering every session it ever ran grew
        its memory by a few KiB per session (``benchmarks/soak.py`` shows it).
        ``wait`` asks the control plane about sessions forgotten here.
        """
        runner = self._runner
        assert runner is not None
        records = runner.records
        # Pruned in batches: a scan per ended session would cost O(kept) each time.
        if len(records) <= _FINISHED_KEPT + _FORGET_BATCH:
            return
        excess = len(records) - _FINISHED_KEPT
        finished = [work_id for work_id, record in records.items() if record.done.is_set()]
        for work_id in finished[:excess]:
            record = records.pop(work_id)
            if runner.by_session.get(record.session_id) is record:
                del runner.by_session[record.session_id]

    # ------------------------------------------------------------ public API

    async def submit(
        self,
        prompt: str,
        *,
        retry: RetryPolicy | None = None,
        priority: int = 0,
        delay: float | None = None,
        not_before: float | None = None,
        key: str | None = None,
        labels: Sequence[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the item's, not this call's)
        **metadata: str,
    ) -> str:
        """Queue a session on this worker's control plane; returns the new item's id.

        ``retry`` makes its failed sessions retry with exponential backoff, then
        land in dead letter (DESIGN §4.2; see `RetryPolicy`). ``priority``:
        higher is claimed first (FIFO within one); ``delay`` (seconds) or
        ``not_before`` (POSIX time): not claimed before then. ``key``: a key
        already used in the environment returns that item's id, queueing nothing.
        ``labels``: only a worker with all of them claims it (routing).
        ``timeout``: seconds of execution its session may take, in place of
        the claiming worker's ``session_timeout``.

        Raises:
            BadRequest: a bad value (a label outside letters, digits and
                ``:._/-``, a timeout outside (0, 7 days], ...); nothing is queued.
        """
        item = await self.control_plane.submit(
            prompt,
            metadata=metadata,
            retry=retry,
            priority=priority,
            delay=delay,
            not_before=not_before,
            key=key,
            labels=labels,
            timeout=timeout,
        )
        return item.id

    async def retry(self, item_id: str) -> WorkItem:
        """Put a stopped item (out of dead letter) back in the queue with fresh attempts.

        The outcome this worker kept of the item's last run is forgotten, so
        `wait` follows the new attempts instead of answering with the old end.
        """
        item = await self.control_plane.retry(item_id)
        if self._runner is not None:
            record = self._runner.records.get(item_id)
            if record is not None and record.done.is_set():
                del self._runner.records[item_id]
                if self._runner.by_session.get(record.session_id) is record:
                    del self._runner.by_session[record.session_id]
        return item

    async def wait(self, item_id: str, *, poll_interval: float = 0.5) -> Outcome:
        """Wait for an item to end; returns its outcome.

        A session run here answers from the worker's own record the moment it
        ends, if the control plane accepted that outcome. Any other item is
        followed on the control plane: one run elsewhere, one whose lease this
        worker lost or whose final stop did not get through (it will run again),
        and one given back after a wedge.
        """
        while True:
            ended = self._session_ended
            record = self._runner.records.get(item_id) if self._runner is not None else None
            if record is not None and not record.done.is_set():
                # Running here: its end is heard here, with no question to the control plane.
                await record.done.wait()
                continue
            if record is not None and _final(record):
                assert record.outcome is not None
                return record.outcome
            item = await self.control_plane.get(item_id)
            if item.state is WorkState.STOPPED:
                return item.outcome or Outcome(
                    OutcomeStatus.FAILED, reason="stopped without outcome"
                )
            with trio.move_on_after(poll_interval):
                await ended.wait()

    async def cancel(self, item_id: str, reason: str = "cancelled") -> None:
        """Stop an item: a session running here is cancelled at once (outcome
        ``cancelled``, reported to the control plane); any other item gets an
        operator stop request (a queued one is stopped, a running one's worker
        sees ``stopping`` at its next heartbeat).
        """
        record = self._runner.records.get(item_id) if self._runner is not None else None
        if record is not None and not record.done.is_set():
            record.cancel(OutcomeStatus.CANCELLED, reason)
            return
        await self.control_plane.request_stop(item_id)

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a budget for the sessions, not for this call
        """Stop claiming, let running sessions finish (up to ``timeout``), then stop.

        ``timeout`` defaults to ``config.drain_timeout``. Sessions still running
        then are cancelled (agents get SIGTERM, grace, SIGKILL) and every item
        is stopped with its outcome. Returns once the worker has stopped.
        """
        if self._tree is None or not self._running:
            return
        self._draining = True
        assert self._work is not None and self._sessions is not None
        with contextlib.suppress(LookupError, RuntimeError):
            await self._work.terminate_child("poller")
        limit = self.config.drain_timeout if timeout is None else timeout
        with trio.move_on_after(limit):
            while self._sessions.count_children().active:
                ended = self._session_ended
                await ended.wait()
        await self._tree.shutdown()

    def snapshot(self) -> SupervisorSnapshot:
        """The live supervision tree (worker → sessions → lease/runner)."""
        if self._tree is None:
            raise RuntimeError("the worker has not run yet")
        return self._tree.snapshot()

    def stats(self) -> WorkerStats:
        active = self._sessions.count_children().active if self._sessions is not None else 0
        return WorkerStats(
            worker_id=self.worker_id,
            capacity=self.config.max_concurrency,
            active=active,
            outcomes=dict(self._outcomes),
            lease_losses=self._outcomes.get(OutcomeStatus.LEASE_LOST.value, 0),
            started=self._started_sessions,
            draining=self._draining,
            restarts=sum(
                sup.total_restarts
                for sup in (self._tree, self._services, self._work, self._sessions)
                if sup is not None
            ),
        )

    def sessions(self) -> list[SessionRecord]:
        """Records of the sessions running here and the last finished ones, oldest first.

        At most ``1000`` finished sessions are remembered (see ``_forget_old_sessions``).
        """
        return list(self._runner.records.values()) if self._runner is not None else []


def _owner(config: WorkerConfig) -> tuple[int, int] | None:
    """``(uid, gid)`` of ``agent_user``, who then owns the workspaces."""
    if config.agent_user is None:
        return None
    import grp
    import pwd

    user = config.agent_user
    entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    group = config.agent_group
    if group is None:
        gid = entry.pw_gid
    elif isinstance(group, int):
        gid = group
    else:
        gid = grp.getgrnam(group).gr_gid
    return entry.pw_uid, gid


def _no_secret() -> None:
    return None


def _final(record: SessionRecord) -> bool:
    """Whether a finished session's own outcome is the item's final one."""
    outcome, lease = record.outcome, record.lease
    if outcome is None or lease is None or not lease.reported or lease.retried:
        return False
    return outcome.status not in REQUEUE_OUTCOMES and outcome.status is not OutcomeStatus.LEASE_LOST


@contextlib.asynccontextmanager
async def open_worker(
    config: WorkerConfig,
    *,
    control_plane: ControlPlane | None = None,
    agent: AgentFunction | AgentSpec | None = None,
    base_env: Mapping[str, str] | None = None,
    keeper_options: KeeperOptions | None = None,
    rng: random.Random | None = None,
    workspaces: Workspaces | None = None,
    offload: Offload | None = None,
) -> AsyncIterator[Worker]:
    """Run a :class:`Worker` for the duration of an ``async with`` block.

    On a normal exit from the block the worker is drained (sessions may finish
    within ``config.drain_timeout``); if the block raises or is cancelled,
    sessions are cancelled at once. Either way every item gets its outcome.
    The keyword arguments are :class:`Worker`'s.
    """
    worker = Worker(
        config,
        control_plane=control_plane,
        agent=agent,
        base_env=base_env,
        keeper_options=keeper_options,
        rng=rng,
        workspaces=workspaces,
        offload=offload,
    )
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            try:
                yield worker
            except BaseException as exc:  # re-raised below, outside the nursery
                body_error = exc
                nursery.cancel_scope.cancel()
            else:
                with trio.CancelScope(shield=True):
                    await worker.drain()
    except BaseExceptionGroup as group:
        raise_saving_context(collapse_group(group))
    if body_error is not None:
        raise_saving_context(body_error)


def _journal_quietly(watcher: DelegationWatcher, session_id: str, work_id: str) -> None:
    """Journal a session; a journal that cannot be written is logged, not raised."""
    try:
        watcher.note_session(session_id, work_id)
    except OSError as exc:
        logger.warning(
            "could not journal session %s for its delegation results: %s", session_id, exc
        )


async def _close_lane(lane: ThreadLane) -> None:
    """Close one of the worker's lanes once the tree is down (every session's cleanup is done)."""
    with trio.CancelScope(shield=True):
        await lane.aclose()
