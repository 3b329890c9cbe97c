"""``python -m supervisor demo``: a guided tour of a worker, about a minute long.

Everything is real: a ``Worker`` on an embedded control plane in a temporary
state directory, the built-in demo agent as a subprocess per session, the
local API on loopback. Each step does one thing, then says what to notice.

The steps that need wedge detection or delegation run only when this build
has them, and say so when it does not, rather than faking them.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

import httpx
import trio
from rich.console import Console
from rich.padding import Padding
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from .._base._groups import collapse_group
from .._base._logging import RedactSecrets
from .._tree._spec import Backoff, ChildSpec
from .._worker._api import status_document
from .._worker._config import WorkerConfig
from .._worker._worker import Worker
from ..controlplane._exceptions import Conflict
from ..controlplane._models import Outcome, OutcomeStatus
from ._common import PROG
from ._status_view import duration_text, tree_renderable

__all__ = ["cli_demo", "run_tour"]

#: Upper bound for any one wait; the tour fails loudly rather than hanging.
_STEP_TIMEOUT: Final = 60.0
#: How long the wedge step waits for the worker to notice the wedge.
_WEDGE_NOTICE_TIMEOUT: Final = 8.0


class _Reporter:
    """A stand-in service under ``services``: it ticks, and crashes when told to.

    It shows what "restarted by policy" means in the tree: a PERMANENT child
    that raises is started again by its supervisor, after a backoff.
    """

    def __init__(self) -> None:
        self.crash_next = trio.Event()
        self.runs = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.runs += 1
        task_status.started()
        await self.crash_next.wait()
        self.crash_next = trio.Event()
        raise RuntimeError("crashed on purpose, for the demo")


class _Tour:
    def __init__(self, worker: Worker, reporter: _Reporter, console: Console, pause: float):
        self.worker = worker
        self.reporter = reporter
        self.console = console
        self.pause = pause
        self.step_no = 0
        self.state = worker.config.state_dir

    # --- output -------------------------------------------------------------------

    def step(self, title: str, what: str) -> None:
        self.step_no += 1
        self.console.print()
        self.console.print(Rule(f"[bold]{self.step_no}. {title}", align="left"))
        self.console.print(what)

    def notice(self, paragraph: str) -> None:
        """What to notice: one paragraph, wrapped to the terminal beside its label."""
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, style="bold cyan")
        grid.add_column(ratio=1)
        grid.add_row("notice:", paragraph)
        self.console.print(grid)

    def say(self, line: str) -> None:
        # Ids, paths and commands are copied from here: never break them across lines.
        self.console.print(line, soft_wrap=True)

    def skipped(self, paragraph: str) -> None:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, style="bold yellow")
        grid.add_column(ratio=1)
        grid.add_row("skipped:", paragraph)
        self.console.print(grid)

    def show_tree(self) -> None:
        self.console.print(Padding(tree_renderable(status_document(self.worker)), (0, 0, 0, 2)))

    def show_outcome(self, item_id: str, outcome: Outcome) -> None:
        style = "green" if outcome.status is OutcomeStatus.COMPLETED else "yellow"
        text = Text(f"  {item_id}  ")
        text.append(outcome.status.value, style=f"bold {style}")
        if outcome.exit_code not in (None, 0):
            text.append(f" (exit code {outcome.exit_code})")
        if outcome.duration is not None:
            text.append(f" after {duration_text(outcome.duration)}")
        if outcome.status is OutcomeStatus.COMPLETED and outcome.result:
            text.append(f"\n    result: {outcome.result}", style="dim")
        elif outcome.reason:
            text.append(f"\n    reason: {outcome.reason}", style="dim")
        self.console.print(text)

    async def breathe(self) -> None:
        await trio.sleep(self.pause)

    # --- helpers ------------------------------------------------------------------

    async def submit(self, prompt: str) -> str:
        item_id = await self.worker.submit(prompt)
        self.say(f'  submitted {item_id}: "{prompt}"')
        return item_id

    async def until(
        self, predicate: Callable[[], bool], what: str, *, limit: float = _STEP_TIMEOUT
    ) -> bool:
        """Wait for ``predicate``; ``what`` names it in the error if it never comes.

        Returns ``False`` instead of raising when ``what`` is empty (an optional wait).
        """
        with trio.move_on_after(limit):
            while True:
                if predicate():
                    return True
                await trio.sleep(0.05)
        if what:
            raise RuntimeError(f"the demo waited {limit:g}s for {what}")
        return False

    def running(self, item_id: str) -> bool:
        return any(r.work_id == item_id and not r.done.is_set() for r in self.worker.sessions())

    async def get(self, path: str) -> httpx.Response:
        assert self.worker.api_url is not None
        async with httpx.AsyncClient(base_url=self.worker.api_url, timeout=10) as client:
            return await client.get(path)

    # --- the steps ----------------------------------------------------------------

    async def start(self) -> None:
        self.step(
            "A worker starts",
            f"A worker runs on an embedded control plane (SQLite) in {self.state}, with the "
            f"built-in demo agent and its local API at {self.worker.api_url}.",
        )
        self.show_tree()
        snapshot = self.worker.snapshot().find("services")
        services = (
            [c.id for c in snapshot.supervisor.children] if snapshot and snapshot.supervisor else []
        )
        self.notice(
            f"two branches. 'services' holds {_listed(services)} ('reporter' is the demo's "
            "own); 'work' holds the sessions supervisor and the poller. A failure under "
            "services never touches work, and the poller claims an item only when a session "
            "slot is free."
        )
        await self.breathe()

    async def normal_sessions(self) -> None:
        self.step(
            "Three sessions",
            f"Three items are queued, as `{PROG} submit PROMPT` would queue them.",
        )
        ids = [
            await self.submit(p)
            for p in ("summarise the README", "list the open TODOs", "count the tests")
        ]
        await self.until(lambda: any(self.running(i) for i in ids), "a session to start")
        self.show_tree()
        self.notice(
            "each session is a small supervisor of its own. 'lease' starts first, and the "
            "'runner' (workspace + agent process) starts only after the first lease heartbeat "
            "succeeded; the lease is then renewed every ttl/3 while the agent works."
        )
        for item_id in ids:
            self.show_outcome(item_id, await self.worker.wait(item_id))
        self.notice(
            "the result is the last JSON line with a 'result' field that the agent printed; "
            f"the whole output is in {self.state / 'logs'}/<item id>.log."
        )
        await self.breathe()

    async def crashing_agent(self) -> None:
        self.step(
            "An agent crashes",
            'The prompt word "crash" makes the demo agent exit with status 3 halfway through.',
        )
        item_id = await self.submit("crash on purpose")
        self.show_outcome(item_id, await self.worker.wait(item_id))
        self.notice(
            "a session is a TEMPORARY child: a crashed agent is not restarted in place, "
            "because running half-done agent work again is for whoever submitted it to decide. "
            "The item is stopped with outcome 'failed' and the exit code, for all to see. Had "
            "the worker itself died, the lease would have run out and the control plane "
            "would have put the item back in the queue for another worker."
        )
        await self.breathe()

    async def crashing_service(self) -> None:
        self.step(
            "A service crashes and is restarted by policy",
            'A slow session runs (the word "slow": about ten seconds) while the demo '
            "'reporter' service under 'services' crashes.",
        )
        slow_id = await self.submit("a slow and careful review")
        await self.until(lambda: self.running(slow_id), "the slow session to start")
        runs = self.reporter.runs
        self.reporter.crash_next.set()
        await self.until(lambda: self.reporter.runs > runs, "the reporter to restart")
        self.show_tree()
        self.notice(
            "'reporter' shows one restart and why it last exited. 'services' is ONE_FOR_ONE "
            "with a backoff, so only the reporter was restarted, and the slow session kept "
            "running: its uptime did not reset. Restarts spend the services budget (10 a "
            "minute); a service crashing faster than that would escalate to the worker."
        )
        await self.breathe()

    async def wedge(self) -> None:
        self.step(
            "A wedged agent",
            'The word "wedge" makes the demo agent print the runtime error "Control request '
            'timeout" and then hang.',
        )
        item_id = await self.submit("wedge the runtime")
        wedge = self.worker.wedge
        if not await self.until(lambda: wedge.is_wedged, "", limit=_WEDGE_NOTICE_TIMEOUT):
            await self._stop_item(item_id)
            self.show_outcome(item_id, await self.worker.wait(item_id))
            self.skipped(
                "this build does not detect wedges yet, so the wedged agent just hung until "
                "it was cancelled. With wedge detection, the session ends 'wedged', the item "
                "goes back to the queue, the worker reports itself degraded (GET /health "
                "answers 503) and claims only a probe now and then until one succeeds."
            )
            await self.breathe()
            return
        await self.until(lambda: not self.running(item_id), "the wedged session to end")
        self.show_outcome(item_id, await _local_outcome(self.worker, item_id))
        health = await self.get("/health")
        self.say(f"  GET /health -> {health.status_code} {health.json()['status']}")
        self.notice(
            "the agent's output matched a wedge pattern: that session was cancelled with "
            "outcome 'wedged' and its item given back to the queue; the worker is marked "
            "wedged, so /health says degraded and the poller claims only a probe now and then."
        )
        await self._stop_item(item_id)  # it would only wedge again; the probe should succeed
        self.say(f"  (the wedging item is cancelled: {PROG} cancel {item_id})")
        recovery_id = await self.submit("a plain task, to probe")
        self.show_outcome(recovery_id, await self.worker.wait(recovery_id))
        await self.until(lambda: not self.worker.wedge.is_wedged, "the wedge to clear")
        health = await self.get("/health")
        self.say(f"  GET /health -> {health.status_code} {health.json()['status']}")
        self.notice("the probe session succeeded, which cleared the wedge: the worker is healthy.")
        await self.breathe()

    async def _stop_item(self, item_id: str) -> None:
        try:
            await self.worker.control_plane.request_stop(item_id)
        except Conflict:
            pass  # already stopped

    async def cancel(self) -> None:
        self.step(
            "An operator cancels a session",
            'The word "hang" makes the demo agent stop printing and never finish.',
        )
        item_id = await self.submit("hang until someone cancels")
        await self.until(lambda: self.running(item_id), "the hanging session to start")
        await trio.sleep(1.0)
        self.say(f"  {PROG} cancel --state-dir {self.state} {item_id}")
        await self.worker.control_plane.request_stop(item_id)
        self.show_outcome(item_id, await self.worker.wait(item_id))
        self.notice(
            "cancel only marks the item 'stopping' in the control plane. The worker learns it "
            "from the next lease heartbeat (every ttl/3: "
            f"{self.worker.config.lease_ttl / 3:.2g}s here), then stops the agent's whole "
            "process group (SIGTERM, a grace period, SIGKILL), removes the workspace and "
            "records the outcome 'cancelled'."
        )
        await self.breathe()

    async def delegation(self) -> None:
        self.step(
            "A delegation",
            'The word "delegate" makes the demo agent hand a sub-task to another agent through '
            "the control plane, with its own session's credential, and wait for the result.",
        )
        if "delegation_poll_interval" not in WorkerConfig.field_names():
            self.skipped(
                "this build has no delegation watcher yet. With it, the delegate's item runs "
                "like any other, and its result is journalled and delivered to the session "
                "that asked, by reference, never pasted into that session's prompt."
            )
            await self.breathe()
            return
        source_id = await self.submit("delegate part of the work")
        self.show_outcome(source_id, await self.worker.wait(source_id))
        for d in await self.worker.control_plane.list_delegations(self.worker.worker_id):
            if d.source_id in {r.session_id for r in self.worker.sessions()}:
                self.say(f"  delegation {d.id}: {d.task!r} ran as {d.work_id}: {d.status.value}")
        journal = self.state / "delegations"
        self.notice(
            "the delegate was an ordinary work item, claimed by this worker like any other. "
            "The delegation watcher saw its result, wrote it to the journal "
            f"({journal}/<worker>.jsonl, fsynced) and delivered it into the asking session's "
            "inbox file while that session still ran. The asking agent read the status; the "
            "delegate's output is data, never pasted into a prompt."
        )
        await self.breathe()

    async def health_and_metrics(self) -> None:
        self.step(
            "Health and metrics",
            f"The local API at {self.worker.api_url} is what a monitor or a load balancer reads.",
        )
        health = await self.get("/health")
        self.say(f"  GET /health -> {health.status_code} {health.text}")
        metrics = (await self.get("/metrics")).text
        wanted = (
            "supervisor_sessions_total",
            "supervisor_restarts_total",
            "supervisor_sessions_active",
            "supervisor_heartbeat_latency_seconds_count",
        )
        self.say("  GET /metrics (a few lines):")
        for line in metrics.splitlines():
            if line.startswith(wanted) and not line.endswith(" 0.0"):
                self.say(f"    {line}")
        self.notice(
            "/health answers 200 only while its status is 'ok' (503 when degraded or "
            "draining); /metrics is the Prometheus text format; /status is the live tree as "
            f"JSON, which `{PROG} status` draws."
        )
        await self.breathe()

    async def drain(self) -> None:
        self.step(
            "A graceful stop",
            "SIGTERM or Ctrl-C drains a worker: no new claims; running sessions may finish "
            f"(up to --drain-timeout, {self.worker.config.drain_timeout:g}s here); any still "
            "running then are cancelled.",
        )
        last_id = await self.submit("one last task")
        await self.until(lambda: self.running(last_id), "the last session to start")
        self.say("  draining (what the first SIGTERM or Ctrl-C does) while it runs")
        await self.worker.drain()
        self.show_outcome(last_id, await _local_outcome(self.worker, last_id))
        outcomes = self.worker.stats().outcomes
        summary = ", ".join(f"{n} {status}" for status, n in sorted(outcomes.items()))
        self.say(f"  the worker stopped; sessions by outcome: {summary}")
        self.notice(
            "every item ended with its outcome recorded in the control plane, and nothing "
            "was left behind: no agent process, no workspace, no lease."
        )


def _listed(names: list[str]) -> str:
    quoted = [f"'{n}'" for n in names]
    return ", ".join(quoted[:-1]) + f" and {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)


async def _local_outcome(worker: Worker, item_id: str) -> Outcome:
    record = next((r for r in worker.sessions() if r.work_id == item_id), None)
    if record is not None and record.outcome is not None:
        return record.outcome
    return Outcome(OutcomeStatus.FAILED, reason="no outcome recorded")


async def run_tour(state_dir: Path, console: Console, *, pause: float = 1.0) -> None:
    """Run every step on a fresh worker in ``state_dir``."""
    settings: dict[str, object] = {
        "state_dir": state_dir,
        "worker_id": "demo-worker",
        "max_concurrency": 3,
        "lease_ttl": 3.0,
        "poll_block_ms": 200,
        "agent_grace": 0.5,
        "drain_timeout": 15.0,
        # Minutes in production, seconds in a one-minute tour:
        "probe_interval": 2.0,
        "presence_interval": 2.0,
        "delegation_poll_interval": 0.3,
    }
    known = set(WorkerConfig.field_names())
    config = WorkerConfig.from_mapping({k: v for k, v in settings.items() if k in known})
    worker = Worker(config)
    reporter = _Reporter()
    worker.add_service(
        ChildSpec("reporter", reporter.run, backoff=Backoff(initial=0.5, maximum=5.0))
    )
    tour = _Tour(worker, reporter, console, pause)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        for step in (
            tour.start,
            tour.normal_sessions,
            tour.crashing_agent,
            tour.crashing_service,
            tour.wedge,
            tour.cancel,
            tour.delegation,
            tour.health_and_metrics,
            tour.drain,
        ):
            await step()


def _log_to_file(path: Path) -> None:
    """The worker's own log goes to a file: the tour's output is the story."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
    )
    handler.addFilter(RedactSecrets())
    root = logging.getLogger("supervisor")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def cli_demo(args: argparse.Namespace) -> int:
    """``python -m supervisor demo``: returns 0 after the tour, 1 if a step failed."""
    if not args.pause >= 0:
        print(f"{PROG} demo: error: --pause must be >= 0, got {args.pause}")
        return 2
    state = Path(tempfile.mkdtemp(prefix="supervisor-demo-"))
    console = Console(highlight=False)
    console.print(
        Text(
            "supervisor demo: a guided tour of a worker (about a minute). Everything here is\n"
            "real: the control plane, the agent processes, the leases, the local API.",
            style="bold",
        )
    )
    console.print(f"state directory: {state}", soft_wrap=True)
    console.print(f"the worker's own log: {state / 'worker.log'}", soft_wrap=True)
    _log_to_file(state / "worker.log")
    code = 0
    try:
        trio.run(lambda: run_tour(state, console, pause=args.pause))
    except Exception as exc:
        logging.getLogger("supervisor.demo").exception("the demo failed")
        leaf = collapse_group(exc) if isinstance(exc, BaseExceptionGroup) else exc
        console.print(f"[bold red]the demo failed:[/] {type(leaf).__name__}: {leaf}")
        console.print(f"the worker's log (with the traceback) is {state / 'worker.log'}")
        code = 1
        return code
    finally:
        logging.shutdown()
        if not args.keep and code == 0:
            shutil.rmtree(state, ignore_errors=True)
    console.print()
    console.print(Rule("[bold]Your turn", align="left"))
    console.print(
        f"  {PROG}                    run a worker in ./.supervisor\n"
        f'  {PROG} submit "a task"    queue work (another terminal)\n'
        f"  {PROG} status             the tree, the workers, the queue\n"
        f"  {PROG} --help             every command and setting"
    )
    if args.keep:
        console.print(f"  the demo's state is kept in {state}")
    return 0
