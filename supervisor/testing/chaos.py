"""Chaos against the real parts: a faulty network between real workers and the real server.

::

    python -m supervisor.testing.chaos run [--seed S] [--items N] [--agent CMD]

What runs, all on ``127.0.0.1``:

* the reference control-plane server (``supervisor.controlplane._server``) in
  its own process, on a SQLite file, with a short lease policy so that lost
  claims come back in seconds (``python -m supervisor.testing.chaos serve``:
  the same server as ``python -m supervisor serve``, with the store's ack lease,
  reclaim window and attempts on flags);
* a :class:`~supervisor.testing.ChaosProxy` in front of it, injecting latency,
  resets (before and after the server answered), truncated answers and 503s;
* real worker processes (``python -m supervisor run --control-plane PROXY``)
  whose agents are real subprocesses that log when they start and end;
* one crash mid-run (no goodbye, once the victim runs an agent), then a
  replacement worker starts. A
  ``machine`` crash freezes a worker and ``SIGKILL``\\ s its agents' groups and
  it; a ``worker`` crash ``SIGKILL``\\ s the worker process alone, so its agents
  live on unless something outside the worker kills them (the reaper of
  DESIGN §3.8);
* optionally one freeze: another worker is stopped with ``SIGSTOP`` for longer
  than the lease ttl (its agents keep running unless the reaper kills them at
  their deadline), then continued with ``SIGCONT``.

Faults stop after ``fault_time`` seconds or ``max_requests`` requests, the
run waits for every item to end (within ``time_limit``), the workers are
stopped with ``SIGTERM`` (drain), and then the invariants are checked from
the records: the server's store file, the proxy's log of what the server
really answered, and the agents' own start/end log:

* every item is stopped with an outcome; attempts within ``max_attempts`` (and
  all of them used when the outcome is a lease expiry);
* the server accepted at most one final ``stop`` per item, and one only if the
  outcome is not the store's own (a ``requeue`` on the last attempt also ends
  an item with the worker's outcome);
* no two agents ever ran for one item at the same time (split brain), and no
  item ran more often than its attempts allow. An agent killed without a word
  (SIGKILL) ends when ``/proc`` first shows it gone: the run watches every
  agent that logged a start and no end;
* a ``completed`` item had an agent that finished with exit code 0;
* every worker stopped on ``SIGTERM`` and no agent process was left behind.

The agent protocol: its prompt is ``"SECONDS CODE LOGFILE [poison]"``; it appends
JSON lines ``{"event": "start"|"end", "work_id", "pid", "time"}`` to LOGFILE
(with ``poison``, its result line holds a lone surrogate escape)
(``python -m supervisor.testing.chaos agent`` is one; ``tests/agents/chaos.py``
another).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import random
import re
import secrets
import shlex
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Final

import attrs
import trio

from ..controlplane._embedded import STORE_FILENAME, EmbeddedControlPlane
from ..controlplane._exceptions import ControlPlaneError
from ..controlplane._http import HttpControlPlane
from ..controlplane._models import OutcomeStatus, WorkItem, WorkState
from ..controlplane._store import DEFAULT_ENVIRONMENT_ID, LeasePolicy, SQLiteStore
from ._proxy import ChaosProxy, ProxyFault, ProxyFaults, ProxyRecord

__all__ = ["ChaosConfig", "ChaosReport", "main", "run_chaos"]

_KEY_ENV: Final = "SUPERVISOR_ENVIRONMENT_KEY"
_ENDING_CALL: Final = re.compile(r"/work/([^/?]+)/(stop|requeue)(?:\?|$)")
_ITEM_CALL: Final = re.compile(r"/work/([^/?]+)/")
_STORE_OUTCOMES: Final = ("lease expired", "lease expired after a stop request")


def default_agent() -> str:
    """The built-in chaos agent (this module's ``agent`` command), as a command line."""
    return f"{shlex.quote(sys.executable)} -m supervisor.testing.chaos agent {{prompt}}"


@attrs.frozen(kw_only=True)
class ChaosConfig:
    """One chaos run.

    Attributes:
        seed: seeds the proxy's faults and the items' work.
        items: work items submitted.
        workers: worker processes (plus one replacement after the crash).
        max_concurrency: sessions per worker.
        lease_ttl: the workers' lease ttl; also the server's ack lease.
        max_attempts: the server's attempts per item.
        reclaim_ms: the server's reclaim window for items polled but not acked.
        agent: the agent command (``{prompt}`` is replaced); see the module notes.
        agent_seconds: range of an agent's work.
        crash_rate: share of items whose agent exits 1.
        crash_after: seconds into the run when worker 0 is killed (``None``: no crash).
        crash_mode: ``machine`` (the worker and its agents die) or ``worker``
            (only the worker process gets SIGKILL; its agents are left to the reaper).
        freeze_after: seconds into the run when worker 1 (worker 0 if it is the
            only one) is frozen with SIGSTOP (``None``: no freeze).
        freeze_for: how long it stays frozen (default: twice the lease ttl).
        reaper: whether the workers run their reaper; ``False`` plants the old
            behaviour back (agents outlive a killed or frozen worker), which the
            split-brain check must catch.
        fault_time: seconds of faults; the proxy only forwards afterwards.
        max_requests: requests after which the proxy only forwards.
        time_limit: seconds for all items to end.
        faults: the proxy's fault rates.
        keep: keep the temporary directory (logs, store) for inspection.
        restart_after: seconds into the run when the control-plane server is
            stopped (``SIGTERM``) and started again on the same port and store
            (``None``: never).
        poison: submit one request holding a lone surrogate (it must be
            refused with a 400 and change nothing), and let a third of the
            agents print a result holding one (it must be recorded, repaired).
        clock_step: seconds the server's wall clock steps by (negative:
            backwards), at ``clock_step_after`` seconds into the run (``None``:
            never). A forward step larger than a fifth of the ttl lets the
            server expire leases its holders still serve: no worker can
            defend against that.
    """

    seed: int = 0
    items: int = attrs.field(default=12, validator=attrs.validators.ge(1))
    workers: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    max_concurrency: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    lease_ttl: float = attrs.field(default=6.0, validator=attrs.validators.gt(0))
    max_attempts: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    reclaim_ms: int = attrs.field(default=2000, validator=attrs.validators.ge(1))
    agent: str = attrs.field(factory=default_agent)
    agent_seconds: tuple[float, float] = (0.2, 3.0)
    crash_rate: float = 0.15
    crash_after: float | None = 5.0
    crash_mode: str = attrs.field(
        default="machine", validator=attrs.validators.in_(("machine", "worker"))
    )
    freeze_after: float | None = None
    freeze_for: float | None = None
    reaper: bool = True
    fault_time: float = 15.0
    max_requests: int = 3000
    time_limit: float = 90.0
    faults: ProxyFaults = attrs.field(factory=ProxyFaults)
    keep: bool = False
    restart_after: float | None = None
    poison: bool = False
    clock_step: float = 0.0
    clock_step_after: float | None = None


@attrs.frozen
class ChaosReport:
    """What a chaos run found.

    Attributes:
        violations: broken invariants (empty when all held).
        outcomes: final outcome status per item, in submission order.
        attempts: final attempts per item.
        requests: requests through the proxy.
        faults: injected faults by kind.
        agent_runs: agent processes started.
        workers: names of the worker processes started (the replacement included).
        crashed: whether a worker was killed mid-run.
        frozen: whether a worker was frozen past the ttl and continued.
        seconds: wall time of the run.
        directory: where the logs and the store were (gone unless ``keep``).
        refused_stops: final ``stop``/``requeue`` calls the server refused with
            ``412`` (a stale fencing token).
        reruns: items whose agent ran more than once.
        completed_not_recorded: items with an agent run that finished with exit
            code 0 whose recorded outcome is not ``completed``.
        restarted: whether the server was restarted mid-run.
        clock_stepped: whether the server's clock was stepped mid-run.
    """

    violations: tuple[str, ...]
    outcomes: tuple[str, ...]
    attempts: tuple[int, ...]
    requests: int
    faults: dict[str, int]
    agent_runs: int
    workers: tuple[str, ...]
    crashed: bool
    seconds: float
    directory: Path
    frozen: bool = False
    refused_stops: int = 0
    reruns: int = 0
    completed_not_recorded: int = 0
    restarted: bool = False
    clock_stepped: bool = False

    @property
    def ok(self) -> bool:
        return not self.violations

    def describe(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()) if k != "pass")
        counts = Counter(self.outcomes)
        ends = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        return (
            f"{len(self.outcomes)} items ({ends}), {self.agent_runs} agent runs, "
            f"{self.requests} requests ({faults or 'no faults'}), "
            f"{self.refused_stops} refused stops, {self.reruns} items re-run, "
            f"{self.completed_not_recorded} completed runs not recorded, {self.seconds:.1f}s, "
            f"{len(self.violations)} violations"
        )


# --- processes -------------------------------------------------------------------


def _log_file(path: Path, *, append: bool = False) -> BinaryIO:
    """A file a child process writes its output to (the child keeps its own handle)."""
    return open(path, "ab" if append else "wb")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _runs_agents(worker: trio.Process, marker: str) -> bool:
    """Whether ``worker`` has an agent (a child whose command line holds ``marker``) now."""
    needle = marker.encode()
    for child in _children(worker.pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if needle in f.read():
                    return True
        except OSError:
            continue
    return False


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _crash(worker: trio.Process) -> list[int]:
    """Freeze a worker, SIGKILL its agents' process groups, then the worker: a lost machine."""
    os.kill(worker.pid, signal.SIGSTOP)  # no new agent may start meanwhile
    killed = []
    for child in _children(worker.pid):
        try:
            os.killpg(child, signal.SIGKILL)  # agents lead their own process groups
            killed.append(child)
        except (ProcessLookupError, PermissionError):
            pass
    os.kill(worker.pid, signal.SIGKILL)
    return killed


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


class _Run:
    def __init__(self, config: ChaosConfig, root: Path) -> None:
        self.config = config
        self.root = root
        self.key = secrets.token_urlsafe(24)
        self.log = root / "agents.jsonl"
        self.rng = random.Random(f"chaos:{config.seed}")
        self.violations: list[str] = []
        self.records: list[ProxyRecord] = []
        self.workers: list[tuple[str, trio.Process]] = []
        self.crashed_at: float | None = None
        self.crashed_agents: set[int] = set()
        self.crashed_workers: set[str] = set()
        self.frozen_at: float | None = None
        #: Wall time when an agent that logged no end was first seen gone.
        self.deaths: dict[int, float] = {}
        self.ids: list[str] = []
        self.agent_run_count = 0
        self.refused_stops = 0
        self.reruns = 0
        self.completed_not_recorded = 0
        self.poisoned: set[str] = set()
        #: Wall-time windows in which the server was down for a restart (or its clock stepped).
        self.restarts: list[tuple[float, float]] = []
        self.clock_stepped = False
        self.restarted = False

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
        env[_KEY_ENV] = self.key
        env.update(extra)
        return env

    async def start_server(self, port: int = 0) -> tuple[trio.Process, str]:
        config = self.config
        argv = [
            sys.executable,
            "-m",
            "supervisor.testing.chaos",
            "serve",
            "--state-dir",
            str(self.root / "server"),
            "--ack-ttl",
            str(config.lease_ttl),
            "--reclaim-ms",
            str(config.reclaim_ms),
            "--max-attempts",
            str(config.max_attempts),
            "--port",
            str(port),
            "--clock-step",
            str(config.clock_step),
        ]
        with _log_file(self.root / "server.log", append=True) as errors:
            process = await trio.lowlevel.open_process(
                argv, stdout=-1, stderr=errors, env=self.env()
            )
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                if not chunk:
                    raise RuntimeError(f"the server exited; see {self.root / 'server.log'}")
                line += chunk
        return process, line.decode().strip()

    async def start_worker(self, name: str, proxy_url: str) -> None:
        config = self.config
        argv = [
            sys.executable,
            "-m",
            "supervisor",
            "run",
            "--control-plane",
            proxy_url,
            "--state-dir",
            str(self.root / name),
            "--agent",
            config.agent,
            "--lease-ttl",
            str(config.lease_ttl),
            "--max-concurrency",
            str(config.max_concurrency),
            "--api-port",
            "0",
            "--drain-timeout",
            "3",
            "--log-format",
            "json",
        ]
        env = self.env(
            SUPERVISOR_WORKER_ID=name,
            SUPERVISOR_AGENT_GRACE=f"{min(1.0, 0.15 * config.lease_ttl):g}",
            SUPERVISOR_POLL_BLOCK_MS="500",
            SUPERVISOR_AGENT_REAPER="true" if config.reaper else "false",
        )
        with _log_file(self.root / f"{name}.log") as log:
            process = await trio.lowlevel.open_process(
                argv, stdin=-3, stdout=log, stderr=log, env=env
            )
        self.workers.append((name, process))

    async def submit(self, server_url: str) -> None:
        config = self.config
        async with HttpControlPlane.open(server_url, key=self.key) as plane:
            for number in range(config.items):
                seconds = self.rng.uniform(*config.agent_seconds)
                code = 1 if self.rng.random() < config.crash_rate else 0
                poison = " poison" if config.poison and number % 3 == 0 else ""
                item = await plane.submit(
                    f"{seconds:.3f} {code} {self.log}{poison}", session_id=f"chaos-{number}"
                )
                self.ids.append(item.id)
                if poison:
                    self.poisoned.add(item.id)
        if config.poison:
            await self.submit_poison(server_url)

    async def submit_poison(self, server_url: str) -> None:
        """A body with a lone surrogate (valid JSON escape) must get a 400 and change nothing."""
        import httpx

        body = b'{"data": {"prompt": "poison"}, "metadata": {"k": "\\udfff"}}'
        async with httpx.AsyncClient(base_url=server_url) as client:
            response = await client.post(
                "/v1/environments/default/work",
                content=body,
                headers={"Authorization": f"Bearer {self.key}", "content-type": "application/json"},
            )
            if response.status_code != 400:
                self.violations.append(
                    f"poison: a lone surrogate in a submit answered {response.status_code}, not 400"
                )

    async def all_ended(self, plane: HttpControlPlane) -> bool:
        try:
            items = await plane.list_work(limit=1000)
        except ControlPlaneError:
            return False
        return len(items) >= len(self.ids) and all(i.state is WorkState.STOPPED for i in items)

    async def watch_deaths(self) -> None:
        """Note when each agent that logged a start but no end is first seen gone."""
        while True:
            ended: set[int] = set()
            started: set[int] = set()
            if self.log.exists():
                for line in self.log.read_text(encoding="utf-8").splitlines():
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    (started if event["event"] == "start" else ended).add(event["pid"])
            now = time.time()
            for pid in started - ended - set(self.deaths):
                if not _alive(pid):
                    self.deaths[pid] = now
            await trio.sleep(0.02)

    async def stop_workers(self) -> None:
        for _, process in self.workers:
            if process.returncode is None:
                process.send_signal(signal.SIGCONT)  # a frozen one, too, must hear it
                process.send_signal(signal.SIGTERM)
        for name, process in self.workers:
            with trio.move_on_after(20) as scope:
                await process.wait()
            if scope.cancelled_caught:
                self.violations.append(f"stuck: {name} did not stop within 20s of SIGTERM")
                process.kill()
                await process.wait()
            elif process.returncode != 0 and name not in self.crashed_workers:
                self.violations.append(f"exit: {name} exited with {process.returncode}")

    # --- checks ------------------------------------------------------------------

    def check(self, items: Sequence[WorkItem]) -> None:
        config = self.config
        by_id = {item.id: item for item in items}
        stops: Counter[str] = Counter()
        requeues: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        faulted: set[str] = set()
        for record in self.records:
            item_call = _ITEM_CALL.search(record.path)
            if item_call and record.fault is not ProxyFault.PASS:
                faulted.add(item_call[1])
            match = _ENDING_CALL.search(record.path)
            if record.method == "POST" and match and record.status == 200:
                (stops if match[2] == "stop" else requeues)[match[1]] += 1
            elif record.method == "POST" and match and record.status == 412:
                refused[match[1]] += 1
        self.refused_stops = sum(refused.values())
        runs = self._agent_runs()
        self.agent_run_count = sum(len(v) for v in runs.values())
        for number, work_id in enumerate(self.ids):
            name = f"item {number}"
            item = by_id.get(work_id)
            if item is None:
                self.violations.append(f"lost: {name} is not on the server")
                continue
            if item.state is not WorkState.STOPPED or item.outcome is None:
                self.violations.append(f"lost: {name} is {item.state.value}")
                continue
            store_made = item.outcome.reason in _STORE_OUTCOMES
            if stops[work_id] > 1:
                self.violations.append(f"finished-twice: {name}: {stops[work_id]} stops accepted")
            if stops[work_id] == 1 and store_made:
                self.violations.append(f"finished-twice: {name}: a stop and a lease expiry")
            if stops[work_id] == 0 and not store_made and not requeues[work_id]:
                self.violations.append(
                    f"finished-twice: {name}: outcome {item.outcome.status.value} "
                    "recorded without an accepted stop"
                )
            if item.attempts > config.max_attempts:
                self.violations.append(f"attempts: {name}: {item.attempts} attempts")
            if item.outcome.reason == "lease expired" and item.attempts != config.max_attempts:
                self.violations.append(
                    f"attempts: {name}: dead-lettered after {item.attempts} attempts"
                )
            mine = runs.get(work_id, [])
            self._check_completed_kept(name, work_id, item, mine, faulted)
            result = item.outcome.result or ""
            if any("\ud800" <= ch <= "\udfff" for ch in result):
                self.violations.append(f"poison: {name}'s recorded result holds a lone surrogate")
            if (
                work_id in self.poisoned
                and item.outcome.status is OutcomeStatus.COMPLETED
                and "\ufffd" not in result
            ):
                self.violations.append(f"poison: {name}'s repaired result is missing")
            if len(mine) > item.attempts + 1:
                self.violations.append(
                    f"attempts: {name}: {len(mine)} agent runs for {item.attempts} lost leases"
                )
            if item.outcome.status is OutcomeStatus.COMPLETED and not any(
                code == 0 for _, _, _, code in mine
            ):
                self.violations.append(f"outcome: {name} completed but no agent finished it")
            ordered = sorted(mine)
            for (_, end, pid, _), (next_start, _, next_pid, _) in itertools.pairwise(ordered):
                if next_start < end and pid != next_pid:
                    self.violations.append(
                        f"split-brain: {name}: agent {next_pid} started {end - next_start:.3f}s "
                        f"before agent {pid} ended"
                    )

    def _check_completed_kept(
        self,
        name: str,
        work_id: str,
        item: WorkItem,
        mine: Sequence[tuple[float, float, int, int | None]],
        faulted: set[str],
    ) -> None:
        """A session that completed is never lost or re-run because of the worker.

        Counted for every item; a violation only where nothing else can be
        blamed: the proxy injected no fault into any call about the item and
        no agent of it was killed with its worker.
        """
        ordered = sorted(mine)
        finished = [n for n, (_, _, _, code) in enumerate(ordered) if code == 0]
        if len(ordered) > 1:
            self.reruns += 1
        if not finished:
            return
        assert item.outcome is not None
        rerun = finished[0] < len(ordered) - 1
        lost = item.outcome.status is not OutcomeStatus.COMPLETED
        if lost:
            self.completed_not_recorded += 1
        margin = 2 * self.config.lease_ttl
        # A killed or frozen worker excuses whatever ran from a while before it on.
        hit = [t for t in (self.crashed_at, self.frozen_at) if t is not None]
        blameless = (
            work_id not in faulted
            and not any(pid in self.crashed_agents for _, _, pid, _ in ordered)
            and not any(end > t - margin for _, end, _, _ in ordered for t in hit)
            and not any(
                start < down_end + margin and down_start - margin < end
                for start, end, _, _ in ordered
                for down_start, down_end in self.restarts
            )
        )
        if (rerun or lost) and blameless:
            what = "ran again" if rerun else f"ended {item.outcome.status.value}"
            self.violations.append(
                f"completed-lost: {name}: its agent completed, then the item {what} "
                "with no network fault or crash to blame"
            )

    def _agent_runs(self) -> dict[str, list[tuple[float, float, int, int | None]]]:
        starts: dict[int, tuple[str, float]] = {}
        ends: dict[int, tuple[float, int | None]] = {}
        if self.log.exists():
            for line in self.log.read_text(encoding="utf-8").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a line cut short by SIGKILL
                if event["event"] == "start":
                    starts[event["pid"]] = (event["work_id"], event["time"])
                else:
                    ends[event["pid"]] = (event["time"], event.get("code"))
        runs: dict[str, list[tuple[float, float, int, int | None]]] = defaultdict(list)
        for pid, (work_id, started) in starts.items():
            if pid in ends:
                ended, code = ends[pid]
            elif pid in self.crashed_agents and self.crashed_at is not None:
                ended, code = self.crashed_at, None
            elif pid in self.deaths:
                ended, code = self.deaths[pid], None
            else:
                self.violations.append(f"leak: agent {pid} for {work_id} never logged its end")
                ended, code = math.inf, None
            runs[work_id].append((started, ended, pid, code))
        return runs


async def run_chaos(config: ChaosConfig | None = None) -> ChaosReport:
    """One chaos run (inside a Trio run, on the real clock); see the module notes.

    Raises:
        RuntimeError: the server could not be started.
    """
    config = config if config is not None else ChaosConfig()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="supervisor-chaos-"))
    run = _Run(config, root)
    proxy: ChaosProxy | None = None
    try:
        async with trio.open_nursery() as nursery:
            server, server_url = await run.start_server()
            servers = [server]
            try:
                port = int(server_url.rsplit(":", 1)[1])
                proxy = ChaosProxy(
                    port, config.faults, seed=config.seed, observer=run.records.append
                )
                proxy_url = await nursery.start(proxy.run)
                await run.submit(server_url)
                nursery.start_soon(run.watch_deaths)
                for number in range(config.workers):
                    await run.start_worker(f"w{number}", proxy_url)
                await _drive(run, proxy, proxy_url, server_url, started, servers)
                server = servers[-1]
                await run.stop_workers()
                for pid in _processes_mentioning(str(run.log)):
                    run.violations.append(f"orphan: agent process {pid} outlived its worker")
                    os.kill(pid, signal.SIGKILL)
                nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    for _, process in run.workers:
                        if process.returncode is None:
                            process.kill()
                            await process.wait()
                    for server in servers:
                        if server.returncode is not None:
                            continue
                        server.send_signal(signal.SIGTERM)
                        with trio.move_on_after(10):
                            await server.wait()
                        if server.returncode is None:
                            server.kill()
                            await server.wait()
        store = SQLiteStore(root / "server" / STORE_FILENAME)
        try:
            items = store.list_work(DEFAULT_ENVIRONMENT_ID, now=time.time(), limit=1000)
        finally:
            store.close()
        run.check(items)
        by_id = {item.id: item for item in items}
        outcomes = tuple(
            (by_id[i].outcome.status.value if by_id[i].outcome is not None else "none")  # type: ignore[union-attr]
            if i in by_id
            else "missing"
            for i in run.ids
        )
        attempts = tuple(by_id[i].attempts if i in by_id else -1 for i in run.ids)
        return ChaosReport(
            violations=tuple(run.violations),
            outcomes=outcomes,
            attempts=attempts,
            requests=proxy.requests if proxy is not None else 0,
            faults=dict(proxy.counts) if proxy is not None else {},
            agent_runs=run.agent_run_count,
            workers=tuple(name for name, _ in run.workers),
            crashed=run.crashed_at is not None,
            seconds=time.monotonic() - started,
            directory=root,
            frozen=run.frozen_at is not None,
            refused_stops=run.refused_stops,
            reruns=run.reruns,
            completed_not_recorded=run.completed_not_recorded,
            restarted=run.restarted,
            clock_stepped=run.clock_stepped,
        )
    finally:
        if not config.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


async def _restart_server(run: _Run, servers: list[trio.Process], server_url: str) -> None:
    """Stop the server (``SIGTERM``) and start it again on the same port and store."""
    down = time.time()
    old = servers[-1]
    old.send_signal(signal.SIGTERM)
    with trio.move_on_after(10):
        await old.wait()
    if old.returncode is None:
        old.kill()
        await old.wait()
    port = int(server_url.rsplit(":", 1)[1])
    for _ in range(50):  # the port may linger a moment
        try:
            new, _ = await run.start_server(port)
        except RuntimeError:
            await trio.sleep(0.1)
            continue
        servers.append(new)
        break
    else:
        run.violations.append("restart: the server did not come back on its port")
    run.restarts.append((down, time.time()))
    run.restarted = True


async def _drive(
    run: _Run,
    proxy: ChaosProxy,
    proxy_url: str,
    server_url: str,
    started: float,
    servers: list[trio.Process],
) -> None:
    """Faults, the crash, a server restart, calm, and the wait for every item to end."""
    config = run.config
    crash_at = None if config.crash_after is None else started + config.crash_after
    restart_at = None if config.restart_after is None else started + config.restart_after
    step_at = None if config.clock_step_after is None else started + config.clock_step_after
    freeze_at = None if config.freeze_after is None else started + config.freeze_after
    thaw_at: float | None = None
    frozen: trio.Process | None = None
    calm_at = started + config.fault_time
    give_up_at = started + config.time_limit
    async with HttpControlPlane.open(server_url, key=run.key, timeout=5.0) as plane:
        while True:
            now = time.monotonic()
            # Each fault waits for its victim to run an agent: one that hits an idle
            # worker tests nothing.
            if (
                crash_at is not None
                and now >= crash_at
                and _runs_agents(run.workers[0][1], str(run.log))
            ):
                crash_at = None
                name, victim = run.workers[0]
                run.crashed_workers.add(name)
                if config.crash_mode == "machine":
                    run.crashed_agents.update(_crash(victim))
                else:
                    victim.send_signal(signal.SIGKILL)  # the worker alone: its agents live on
                run.crashed_at = time.time()
                await victim.wait()
                await run.start_worker(f"w{config.workers}", proxy_url)
            target = run.workers[1 if config.workers > 1 else 0][1]
            if freeze_at is not None and now >= freeze_at and _runs_agents(target, str(run.log)):
                freeze_at = None
                frozen = target
                if frozen.returncode is None:
                    frozen.send_signal(signal.SIGSTOP)
                    run.frozen_at = time.time()
                    thaw_at = now + (config.freeze_for or 2 * config.lease_ttl)
            if thaw_at is not None and now >= thaw_at and frozen is not None:
                thaw_at = None
                if frozen.returncode is None:
                    frozen.send_signal(signal.SIGCONT)
            if step_at is not None and now >= step_at:
                step_at = None
                servers[-1].send_signal(signal.SIGUSR1)
                stepped = time.time()
                run.restarts.append((stepped, stepped))  # a clock step excuses too
                run.clock_stepped = True
            if restart_at is not None and now >= restart_at:
                restart_at = None
                await _restart_server(run, servers, server_url)
            if now >= calm_at or proxy.requests >= config.max_requests:
                proxy.calm()
            waiting = (
                crash_at is not None
                or freeze_at is not None
                or thaw_at is not None
                or restart_at is not None
                or step_at is not None
            )
            if not waiting and await run.all_ended(plane):
                return
            if now >= give_up_at:
                return  # the check reports what did not end
            await trio.sleep(0.25)


# --- the server and the agent -------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    from ..controlplane._server import serve_control_plane

    key = os.environ.get(_KEY_ENV, "")
    state = Path(args.state_dir)
    policy = LeasePolicy(
        default_ttl=args.ack_ttl,
        min_ttl=min(0.5, args.ack_ttl),
        max_attempts=args.max_attempts,
        reclaim_older_than_ms=args.reclaim_ms,
    )
    store = SQLiteStore(state / STORE_FILENAME, lease_policy=policy)
    offset = [0.0]  # SIGUSR1 steps the server's wall clock by --clock-step seconds

    def clock() -> float:
        return time.time() + offset[0]

    def plane(environment_id: str) -> EmbeddedControlPlane:
        return EmbeddedControlPlane(store, environment_id=environment_id, clock=clock)

    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(
                    functools.partial(
                        serve_control_plane, plane, host=args.host, port=args.port, key_provider=key
                    )
                )
                print(url, flush=True)
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        offset[0] += args.clock_step
                        continue
                    nursery.cancel_scope.cancel()
                    break
    finally:
        store.close()


def _agent(args: argparse.Namespace) -> int:
    words = " ".join(args.prompt).split()
    seconds, code, log = float(words[0]), int(words[1]), words[2]
    poison = words[3:4] == ["poison"]
    work_id = os.environ.get("SUPERVISOR_WORK_ID", "?")

    def record(event: str, **extra: object) -> None:
        line = {"event": event, "work_id": work_id, "pid": os.getpid(), "time": time.time()}
        line.update(extra)
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def on_term(signum: int, frame: object) -> None:
        record("end", signal="SIGTERM")
        os._exit(143)

    signal.signal(signal.SIGTERM, on_term)
    record("start")
    time.sleep(seconds)
    record("end", code=code)
    if code == 0:
        # ``poison``: a valid JSON escape that is not valid Unicode
        result = f"slept {seconds}" + (" \\ud800" if poison else "")
        print(f'{{"result": "{result}"}}', flush=True)  # raw JSON text, escape kept
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.testing.chaos",
        description="Chaos run: real server, fault-injecting proxy, real workers and agents.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one chaos run; prints the findings")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--items", type=int, default=12)
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--agent", default=None, help="agent command with {prompt}")
    run.add_argument("--keep", action="store_true", help="keep the logs and the store")
    run.add_argument("--lease-ttl", type=float, default=6.0)
    run.add_argument("--crash-mode", choices=("machine", "worker"), default="machine")
    run.add_argument("--freeze-after", type=float, default=None, help="SIGSTOP worker 1 then")
    run.add_argument(
        "--no-reaper", action="store_true", help="plant the old behaviour: workers without reaper"
    )
    serve = sub.add_parser("serve", help="the reference server with a short lease policy")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--state-dir", required=True)
    serve.add_argument("--ack-ttl", type=float, default=60.0)
    serve.add_argument("--reclaim-ms", type=int, default=30_000)
    serve.add_argument("--max-attempts", type=int, default=3)
    serve.add_argument(
        "--clock-step", type=float, default=0.0, help="seconds SIGUSR1 steps the clock by"
    )
    agent = sub.add_parser("agent", help="the built-in chaos agent")
    agent.add_argument("prompt", nargs="+", help="SECONDS CODE LOGFILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 when an invariant broke)."""
    args = _parser().parse_args(argv)
    if args.command == "agent":
        return _agent(args)
    if args.command == "serve":
        Path(args.state_dir).mkdir(parents=True, exist_ok=True)
        trio.run(_serve, args)
        return 0
    config = ChaosConfig(
        seed=args.seed,
        items=args.items,
        workers=args.workers,
        agent=args.agent or default_agent(),
        keep=args.keep,
        lease_ttl=args.lease_ttl,
        crash_mode=args.crash_mode,
        freeze_after=args.freeze_after,
        reaper=not args.no_reaper,
    )
    report = trio.run(run_chaos, config)
    for violation in report.violations:
        print(violation)
    print(report.describe())
    if config.keep:
        print(f"logs and store in {report.directory}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
