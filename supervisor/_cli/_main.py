"""Command line: ``python -m supervisor [run|submit|status|cancel|retry|serve|demo|delegate] ...``.

``python -m supervisor`` with no arguments (or with only options) is ``run``:
a worker on the embedded control plane in ``./.supervisor/`` with the
built-in demo agent and the local API on 127.0.0.1.

Settings come from a TOML file (``--config`` or ``SUPERVISOR_CONFIG``), then
``SUPERVISOR_*`` variables, then flags, later ones winning; see
``supervisor._settings``.

Exit codes (scripts depend on them):

- 0: a clean stop (also after SIGTERM/SIGINT: draining is a clean stop);
- 1: the supervisor gave up (a restart budget was spent), or a one-shot
  command could not reach its control plane;
- 2: bad usage or configuration, named in the message on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from .._base._describe import describe_exception
from .._base._exceptions import ConfigError
from .._base._logging import configure_logging
from .._tree._exceptions import ChildStartError, RestartIntensityExceeded
from .._worker._config import DEFAULT_AGENT, WorkerConfig, agent_text
from ..controlplane._codec import decode_time
from ..controlplane._dashboard_html import worker_labels
from ..controlplane._exceptions import (
    BadRequest,
    Conflict,
    ControlPlaneError,
    NotFound,
    QueueFull,
)
from ..controlplane._models import RetryPolicy, WorkItem, WorkState
from ..controlplane._protocol import ControlPlane
from ..controlplane._store._common import (
    check_key,
    check_labels,
    check_retry,
    check_schedule,
    check_timeout,
)
from ._common import EXIT_GAVE_UP, EXIT_OK, EXIT_USAGE, PROG
from ._policies import add_environment_arguments
from ._settings import (
    config_from_layers,
    config_path_from_environment,
    read_environment,
    read_toml,
)

if TYPE_CHECKING:
    from .._worker._worker import Worker

__all__ = ["EXIT_GAVE_UP", "EXIT_OK", "EXIT_USAGE", "build_parser", "load_config", "main"]

#: The run loop's own notices (signals, the final summary) go through logging, so that
#: ``--log-format json`` output stays one JSON object per line.
logger = logging.getLogger("supervisor.cli")
_DEFAULTS = {a.name: a.default for a in attrs.fields(WorkerConfig)}
#: How long one-shot commands wait for the control plane or a worker's API.
_ONE_SHOT_TIMEOUT: Final = 30.0
_API_TIMEOUT: Final = 3.0

_EPILOG = """\
settings: a TOML file (--config FILE or SUPERVISOR_CONFIG), then SUPERVISOR_* environment
variables (SUPERVISOR_MAX_CONCURRENCY=8, ...), then flags; later ones win. Any variable
may be given as SUPERVISOR_X_FILE, a file holding the value (use it for
SUPERVISOR_ENVIRONMENT_KEY). Unknown settings and bad values are errors naming the setting.

exit codes: 0 clean stop, 1 the supervisor gave up, 2 bad usage or configuration.

start here:
  python -m supervisor                      run a worker in ./.supervisor (demo agent)
  python -m supervisor submit "a task"      queue work for it (from another terminal)
  python -m supervisor status               the supervision tree, workers and queue
  python -m supervisor demo                 a one-minute guided tour
"""


class _Formatter(argparse.HelpFormatter):
    """Wraps prose paragraphs to the terminal, keeps indented lines (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith("  ") for line in lines[1:]):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(
                    textwrap.fill(
                        " ".join(lines), width, initial_indent=indent, subsequent_indent=indent
                    )
                )
        return "\n\n".join(paragraphs)


# --------------------------------------------------------------------------- parser


def _default(name: str) -> str:
    value = _DEFAULTS[name]
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="a TOML file of settings: the keys are the long flag names with underscores "
        "(max_concurrency = 8), at the top level or in a [worker] table; environment "
        "variables override it, flags override both (default: $SUPERVISOR_CONFIG, if set)",
    )


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the work lives: the flags every command that talks to a control plane takes."""
    _add_config_argument(parser)
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="the state directory: the embedded control plane's SQLite store, session logs, "
        "workspaces, and api.json of the worker running there (default: ./.supervisor)",
    )
    parser.add_argument(
        "--control-plane",
        metavar="URL",
        action="append",
        help="use the control plane served at URL (python -m supervisor serve) instead of "
        "the embedded one; its key comes from SUPERVISOR_ENVIRONMENT_KEY or, better, "
        "SUPERVISOR_ENVIRONMENT_KEY_FILE (never from a flag: flags show up in ps). Repeat "
        "the flag (or comma-separate) to name several replicas, tried in turn. A "
        "postgresql://... URL uses the fleet database directly (password from "
        "SUPERVISOR_DATABASE_URL_FILE or PGPASSFILE)",
    )
    parser.add_argument(
        "--environment-id",
        metavar="ID",
        help="the environment (a separate queue) to use (default: default)",
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    _add_target_arguments(parser)
    parser.add_argument(
        "--worker-id",
        metavar="ID",
        help="this worker's id on the control plane (default: HOST-PID-RANDOM)",
    )
    parser.add_argument(
        "--label",
        dest="labels",
        action="append",
        metavar="LABEL",
        help="a routing label this worker has (repeatable, e.g. --label gpu --label repo:foo): "
        "it claims only items whose labels (submit --label) it all has, and without any only "
        "unlabelled items; shown in status (default: none)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        metavar="N",
        help=f"sessions run at once; no work is claimed beyond it "
        f"(default: {_default('max_concurrency')})",
    )
    parser.add_argument(
        "--agent",
        metavar="CMD",
        help='the agent command, e.g. "claude -p {prompt} --output-format json": split like '
        "a shell but never run by one; {prompt}, {work_id} and {session_id} are substituted "
        "in each argument; or package.module:function for an in-process async agent; "
        "in a TOML file it may also be a list of the arguments, never split "
        "(default: the built-in demo agent)",
    )
    parser.add_argument(
        "--agent-env",
        action="append",
        metavar="NAME",
        help="pass this environment variable on to agents (repeatable); agents get a small "
        "allowlist otherwise, and never the environment key",
    )
    parser.add_argument(
        "--agent-user",
        metavar="USER",
        help="run agents as this user (name or uid; the worker must run as root), so they "
        "can read neither the worker's environment nor its key file",
    )
    parser.add_argument(
        "--agent-group",
        metavar="GROUP",
        help="the agents' group with --agent-user (default: the user's primary group)",
    )
    parser.add_argument(
        "--session-log-max-bytes",
        type=int,
        metavar="N",
        help="the most one session's log may take on disk; it is rotated once at half of it "
        f"(default: {_default('session_log_max_bytes')})",
    )
    parser.add_argument(
        "--agent-grace",
        type=float,
        metavar="S",
        help="seconds an agent gets between SIGTERM and SIGKILL when it is stopped; "
        "must be under 0.2 x the lease ttl (default: 5, or 0.15 x the lease ttl if less)",
    )
    parser.add_argument(
        "--workspace",
        choices=("none", "git"),
        help="each session's working directory: none = a fresh empty directory, git = a "
        "local clone of --base-repo (default: none)",
    )
    parser.add_argument(
        "--base-repo",
        metavar="PATH",
        help="the repository that git workspaces clone (required with --workspace git)",
    )
    parser.add_argument(
        "--keep-workspaces",
        action="store_true",
        default=None,
        help="leave workspaces on disk after sessions, for debugging",
    )
    parser.add_argument(
        "--api-host",
        metavar="HOST",
        help="address of the local HTTP API (a live page at /; /health, /metrics, /status); "
        "it has no authentication, so keep it on loopback unless a firewall guards it "
        "(default: 127.0.0.1)",
    )
    parser.add_argument(
        "--api-port",
        type=int,
        metavar="PORT",
        help="port of the local HTTP API; 0 picks a free one; the URL is written to "
        "STATE_DIR/api.json either way (default: 0)",
    )
    parser.add_argument(
        "--no-api",
        dest="api_enabled",
        action="store_false",
        default=None,
        help="do not run the local HTTP API (status then shows only the control plane's view)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        metavar="S",
        help="the lease ttl to ask the control plane for, in seconds: heartbeats go every "
        "ttl/3, and a stop request (cancel) is seen within that time; a worker that dies "
        f"loses its items after it (default: {_default('lease_ttl')})",
    )
    parser.add_argument(
        "--session-timeout",
        type=float,
        metavar="S",
        help="seconds a session may run (not counting the wait for a slot); then it is "
        "stopped with outcome timeout (default: none)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log lines on stderr: readable text, or one JSON object per line (default: text)",
    )
    add_environment_arguments(parser, serve=False)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds running sessions get to finish before they are "
        f"cancelled; a second signal cancels them at once (default: {_default('drain_timeout')})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (one sub-parser per command)."""
    from .._version import __version__
    from ._serve import add_serve_arguments

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A Trio supervisor for self-hosted agent workers: it claims work items "
        "from a control plane, keeps each item's lease alive, runs an agent per item in its "
        "own workspace, and records how each session ended.\n\n"
        "With no command it runs a worker (see 'run --help').",
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a worker (the default command)",
        description="Run a worker: claim work, keep leases, run agents, record outcomes.\n\n"
        "SIGTERM or SIGINT (Ctrl-C) drains: no new claims, running sessions get "
        "--drain-timeout to finish, then they are cancelled (agents get SIGTERM, "
        "--agent-grace, SIGKILL) and every item is stopped with its outcome; exit 0. "
        "A second signal cancels the running sessions at once.",
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    _add_run_arguments(run)

    submit = sub.add_parser(
        "submit",
        help="queue a session for an agent",
        description="Queue a session and print the new item's id on stdout. Works whether "
        "or not a worker is running: items wait in the queue.",
        formatter_class=_Formatter,
    )
    submit.add_argument("prompt", metavar="PROMPT", help="the task for the agent")
    submit.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a metadata entry stored with the item (repeatable)",
    )
    submit.add_argument(
        "--priority",
        type=int,
        default=0,
        metavar="N",
        help="higher is claimed first, first in first out within one priority (-1000 to 1000; "
        "default: %(default)s)",
    )
    submit.add_argument(
        "--label",
        dest="item_labels",
        action="append",
        default=[],
        metavar="LABEL",
        help="a routing label the item requires (repeatable): only a worker run with every "
        "one of them (run --label) claims it; letters, digits and :._/- (e.g. gpu, repo:foo)",
    )
    submit.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="seconds of execution its session may take (not counting the wait for a slot), "
        "in place of the worker's --session-timeout; then it ends with outcome timeout",
    )
    submit.add_argument(
        "--key",
        metavar="KEY",
        help="idempotency key: if an item of the environment already has it, print that "
        "item's id and queue nothing",
    )
    when = submit.add_mutually_exclusive_group()
    when.add_argument(
        "--delay",
        type=float,
        metavar="SECONDS",
        help="do not start it before this many seconds from now",
    )
    when.add_argument(
        "--not-before",
        metavar="TIME",
        help="do not start it before this ISO-8601 time (with a zone, e.g. 2030-01-01T09:00:00Z)",
    )
    retry = submit.add_argument_group(
        "retry policy",
        "A failed session is retried after an exponential backoff with jitter (half to all "
        "of BACKOFF * 2^(failures - 1), capped by --backoff-max) until --max-attempts "
        "attempts ran; then the item is stopped in dead letter (status --dead; retry ID "
        "brings it back). Without any of these flags a failure is final.",
    )
    retry.add_argument(
        "--max-attempts", type=int, metavar="N", help="attempts in all, the first included (1-100)"
    )
    retry.add_argument(
        "--backoff",
        type=float,
        metavar="SECONDS",
        help="the wait before the second attempt; doubled for each further one (default: 1)",
    )
    retry.add_argument(
        "--backoff-max",
        type=float,
        metavar="SECONDS",
        help="the longest single wait (default: 300)",
    )
    retry.add_argument(
        "--no-retry-exit-code",
        type=int,
        action="append",
        default=[],
        metavar="CODE",
        help="an agent exit code whose failure is final at once (repeatable)",
    )
    _add_target_arguments(submit)

    status = sub.add_parser(
        "status",
        help="show the supervision tree, the workers and the queue",
        description="Show the live supervision tree of the worker running in the state "
        "directory (from its local API, found through STATE_DIR/api.json), the workers "
        "the control plane knows, the queue and the newest work items.",
        formatter_class=_Formatter,
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print the same as one JSON document, for scripts: items (id, state, outcome, "
        "...), workers, queue, and worker (the live snapshot, or null)",
    )
    status.add_argument(
        "--limit",
        type=int,
        default=50,
        metavar="N",
        help="show the newest N items, plus any still running (default: %(default)s)",
    )
    status.add_argument(
        "--dead",
        action="store_true",
        help="list only the dead letter: items stopped out of attempts (oldest first, up to "
        "--limit); bring one back with retry ID",
    )
    _add_target_arguments(status)

    retry_cmd = sub.add_parser(
        "retry",
        help="put a stopped work item back in the queue",
        description="Put a stopped item (typically from the dead letter, see status --dead) "
        "back to queued with fresh attempts. It keeps its id, session, retry policy and "
        "attempt history.",
        formatter_class=_Formatter,
    )
    retry_cmd.add_argument("id", metavar="ID", help="the work item's id")
    _add_target_arguments(retry_cmd)

    cancel = sub.add_parser(
        "cancel",
        help="stop a work item",
        description="Operator stop. A queued item is stopped at once (outcome cancelled). "
        "A running one is marked stopping: the worker serving it sees that at its next "
        "lease heartbeat (every ttl/3), stops the agent and its process group, and records "
        "the outcome cancelled.",
        formatter_class=_Formatter,
    )
    cancel.add_argument("id", metavar="ID", help="the work item's id (as submit printed it)")
    _add_target_arguments(cancel)

    serve = sub.add_parser(
        "serve",
        help="serve the control plane over HTTP, for workers on other machines",
        description="Serve the embedded control-plane store of --state-dir over HTTP, so "
        "workers elsewhere can use it with --control-plane URL. The environment key comes "
        "from SUPERVISOR_ENVIRONMENT_KEY or SUPERVISOR_ENVIRONMENT_KEY_FILE; the server "
        "refuses to start without one. Prints the base URL on stdout once listening.",
        formatter_class=_Formatter,
    )
    add_serve_arguments(serve)

    migrate = sub.add_parser(
        "migrate",
        help="bring a PostgreSQL control-plane database's schema up to date",
        description="Apply the pending schema migrations of the fleet database at URL, under "
        "an advisory lock (safe while replicas start). serve and run migrate on start too; "
        "this is for doing it ahead of a rollout. The password comes from "
        "SUPERVISOR_DATABASE_URL_FILE or PGPASSFILE.",
        formatter_class=_Formatter,
    )
    migrate.add_argument(
        "--control-plane",
        "--database",
        dest="database",
        metavar="URL",
        required=True,
        help="the database (postgresql://...)",
    )

    demo = sub.add_parser(
        "demo",
        help="a guided tour of about a minute",
        description="A scripted tour on a temporary state directory: a worker with the demo "
        "agent, normal sessions, a crashing agent, a crashing service restarted by its "
        "supervisor, a cancelled session, a drain; each step says what to notice.",
        formatter_class=_Formatter,
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary state directory afterwards (its path is printed)",
    )
    demo.add_argument(
        "--pause",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds to pause between steps, to read (default: %(default)s)",
    )
    from ._delegate import add_delegate_arguments

    delegate = sub.add_parser(
        "delegate",
        help="from inside a session: hand a task to another agent",
        description="Run by an agent inside a session: queues TASK as a new work item linked "
        "to the session and prints the delegation's id. It uses the session's own credential "
        "(SUPERVISOR_SESSION_* variables the worker gives its agents), never the environment "
        "key. The result comes back to the session: into "
        "$SUPERVISOR_WORKSPACE/.supervisor-inbox.jsonl while it runs, otherwise as a "
        "follow-up message. Exit codes: 0 delegated, 1 refused or unreachable (the session "
        "ended, the credential is not live), 2 usage (no session variables, an empty task).",
        formatter_class=_Formatter,
    )
    add_delegate_arguments(delegate)
    return parser


# ------------------------------------------------------------------------- settings


def _flag_layer(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (``None`` = not given, so lower layers show through)."""
    names = set(WorkerConfig.field_names())
    layer = {name: value for name, value in vars(args).items() if name in names}
    if layer.get("agent_env") is not None:
        layer["agent_env"] = tuple(layer["agent_env"])
    if layer.get("labels") is not None:
        layer["labels"] = tuple(layer["labels"])
    if isinstance(layer.get("control_plane"), list):  # --control-plane repeated
        layer["control_plane"] = ",".join(layer["control_plane"])
    return layer


def load_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> WorkerConfig:
    """TOML file < ``SUPERVISOR_*`` environment < flags.

    Raises:
        ConfigError: naming the setting at fault.
    """
    env = dict(os.environ if environ is None else environ)
    path = getattr(args, "config", None) or config_path_from_environment(env)
    file_layer = read_toml(path) if path is not None else {}
    return config_from_layers(file_layer, read_environment(env), _flag_layer(args))


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _config_cause(exc: BaseException) -> ConfigError | None:
    """The ``ConfigError`` behind a start failure (e.g. the API's port was taken)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConfigError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (
        args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version")
    ):
        args_list.insert(0, "run")
    args = build_parser().parse_args(args_list)
    handler = _HANDLERS[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        return _error(str(exc))


# ------------------------------------------------------------------------------ run


def _secrets(config: WorkerConfig) -> list[str]:
    found = [config.environment_key] if config.environment_key else []
    if config.environment_key_file is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            found.append(config.environment_key_file.read_text(encoding="utf-8").strip())
    return found


def cli_run(args: argparse.Namespace) -> int:
    """``run``: a worker until SIGTERM/SIGINT (drain) or until the tree gives up."""
    config = load_config(args)
    configure_logging(config.log_format, secrets=_secrets(config))
    from .._worker._api import check_api_address
    from .._worker._protect import hide_secrets, warn_if_readable
    from .._worker._worker import Worker

    # The configuration is read: nothing needs the key in the environment any more,
    # and an agent must not find it in /proc/$PPID/environ.
    hide_secrets()
    warn_if_readable(config.environment_key_file)

    if config.api_enabled:
        check_api_address(config.api_host, config.api_port)
    worker = Worker(config)
    started = False

    def on_started() -> None:
        nonlocal started
        started = True

    try:
        trio.run(_run_until_signalled, worker, config, on_started)
    except ConfigError as exc:
        return _error(str(exc))
    except RestartIntensityExceeded as exc:
        print(f"{PROG}: the supervisor gave up: {exc}", file=sys.stderr)
        return EXIT_GAVE_UP
    except ChildStartError as exc:
        cause = _config_cause(exc)
        if cause is not None:
            return _error(str(cause))
        print(f"{PROG}: the worker could not start: {exc}", file=sys.stderr)
        return EXIT_GAVE_UP
    except ControlPlaneError as exc:
        if not started:
            return _error(f"cannot use the control plane: {exc}")
        print(f"{PROG}: the supervisor gave up: {exc}", file=sys.stderr)
        return EXIT_GAVE_UP
    return EXIT_OK


def _shown(target: str | None) -> str:
    """A control-plane setting as it may be printed: a database password never is."""
    from ..controlplane._store._dburl import is_postgres_url, redact

    if target is None:
        return ""
    return redact(target) if is_postgres_url(target) else target


def _banner(worker: Worker, config: WorkerConfig) -> str:
    state = config.state_dir.absolute()
    if config.embedded:
        where = f"the embedded control plane in {state}"
        target = "" if config.state_dir == Path(".supervisor") else f" --state-dir {state}"
    else:
        where = f"the control plane at {_shown(config.control_plane)}"
        target = f" --control-plane {_shown(config.control_plane)}"
    if config.environment_id != "default":
        target += f" --environment-id {config.environment_id}"
    agent = (
        "the built-in demo agent (prompt words crash, hang, wedge, slow make it misbehave)"
        if config.agent == DEFAULT_AGENT
        else agent_text(config.agent)
    )
    api = worker.api_url or "off (--no-api)"
    return "\n".join(
        [
            f"supervisor: worker {config.worker_id} is running.",
            "  It claims work items from the queue, runs the agent on each one in a",
            "  workspace of its own, keeps the item's lease alive meanwhile, and records",
            "  how each session ended.",
            f"  queue:         {where} (environment {config.environment_id!r})",
            f"  agent:         {agent}",
            f"  capacity:      {config.max_concurrency} sessions at once",
            f"  session logs:  {state / 'logs'}",
            f"  local API:     {api}"
            + ("  (live page at /; /health /metrics /status)" if worker.api_url else ""),
            "Try, from another terminal in this directory:",
            f'  {PROG} submit{target} "describe this repository"',
            f"  {PROG} status{target}",
            f"  {PROG} cancel{target} ITEM_ID",
            f"Stop with Ctrl-C: running sessions get {config.drain_timeout:g}s to finish; "
            "a second Ctrl-C cancels them.",
        ]
    )


async def _run_until_signalled(
    worker: Worker, config: WorkerConfig, on_started: Callable[[], None]
) -> None:
    """Run the worker; the first signal drains it, the second cancels its sessions.

    The signal receiver stays open until the worker has stopped, so a third
    Ctrl-C during the final teardown is reported instead of turning into a
    ``KeyboardInterrupt`` that would skip the agents' SIGKILL and the items'
    outcomes.
    """
    from .._base._groups import collapse_group, raise_saving_context

    worker_scope = trio.CancelScope()
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def run_worker(*, task_status: trio.TaskStatus[Worker]) -> None:
                    try:
                        with worker_scope:
                            await worker.run(task_status=task_status)
                    finally:
                        nursery.cancel_scope.cancel()

                await nursery.start(run_worker)
                on_started()
                print(_banner(worker, config), flush=True)
                count = 0
                async for signum in signals:
                    count += 1
                    name = signal.Signals(signum).name
                    if count == 1:
                        logger.info(
                            "%s: draining: no new work is claimed; running sessions get %gs "
                            "to finish (send it again to cancel them now)",
                            name,
                            config.drain_timeout,
                        )
                        nursery.start_soon(worker.drain)
                    elif count == 2:
                        logger.warning(
                            "%s: cancelling running sessions now (agents get SIGTERM, then "
                            "SIGKILL after %gs)",
                            name,
                            config.agent_grace,
                        )
                        worker_scope.cancel()
                    else:
                        logger.warning("%s: already stopping; waiting for the agents to exit", name)
    except BaseExceptionGroup as group:
        raise_saving_context(collapse_group(group))
    outcomes = worker.stats().outcomes
    summary = ", ".join(f"{n} {status}" for status, n in sorted(outcomes.items())) or "none"
    logger.info("worker %s stopped; sessions by outcome: %s", config.worker_id, summary)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- one-shot commands


def _target_config(args: argparse.Namespace) -> WorkerConfig:
    """The settings of a command that talks to a control plane (same layers as ``run``)."""
    config = load_config(args)
    configure_logging("text", level=logging.WARNING, secrets=_secrets(config))
    return config


def _open_target(config: WorkerConfig) -> contextlib.AbstractAsyncContextManager[ControlPlane]:
    return config.open_control_plane(
        missing_key="--control-plane needs the environment key: set "
        "SUPERVISOR_ENVIRONMENT_KEY_FILE (a file holding it) or SUPERVISOR_ENVIRONMENT_KEY",
    )


def _store_missing(config: WorkerConfig) -> bool:
    from ..controlplane._embedded import STORE_FILENAME

    return config.embedded and not (config.state_dir / STORE_FILENAME).exists()


def _run_one_shot(action: Callable[[], Awaitable[int]]) -> int:
    """Run a one-shot command's coroutine, mapping control-plane failures to exit codes."""

    async def bounded() -> int:
        with trio.fail_after(_ONE_SHOT_TIMEOUT):
            return await action()

    try:
        return trio.run(bounded)
    except trio.TooSlowError:
        print(
            f"{PROG}: error: no answer from the control plane within {_ONE_SHOT_TIMEOUT:g}s",
            file=sys.stderr,
        )
        return EXIT_GAVE_UP
    except ConfigError:
        raise
    except NotFound as exc:
        return _error(str(exc))
    except QueueFull as exc:
        # Backpressure, not a failure of the control plane: say what and when, on one line.
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_GAVE_UP
    except ControlPlaneError as exc:
        print(f"{PROG}: error: {describe_exception(exc)}", file=sys.stderr)
        return EXIT_GAVE_UP


def cli_submit(args: argparse.Namespace) -> int:
    """``submit``: queue a session; prints its id (only the id, for scripts) on stdout."""
    metadata: dict[str, str] = {}
    for entry in args.metadata:
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            return _error(f"--metadata expects KEY=VALUE, got {entry!r}")
        metadata[key.strip()] = value
    if not args.prompt.strip():
        return _error("the prompt is empty: say what the agent should do")
    policy: RetryPolicy | None = None
    if (
        args.max_attempts is not None
        or args.backoff is not None
        or args.backoff_max is not None
        or args.no_retry_exit_code
    ):
        defaults = RetryPolicy()
        policy = RetryPolicy(
            max_attempts=defaults.max_attempts if args.max_attempts is None else args.max_attempts,
            backoff=defaults.backoff if args.backoff is None else args.backoff,
            backoff_max=defaults.backoff_max if args.backoff_max is None else args.backoff_max,
            non_retryable_exit_codes=tuple(args.no_retry_exit_code),
        )
        try:
            check_retry(policy)
        except BadRequest as exc:
            return _error(f"bad retry policy: {exc}")
    not_before: float | None = None
    if args.not_before is not None:
        try:
            not_before = decode_time(args.not_before, "--not-before")
        except BadRequest as exc:
            return _error(str(exc))
    try:
        check_schedule(args.priority, args.delay, not_before)
        check_key(args.key)
        labels = check_labels(args.item_labels, "--label")
        timeout = check_timeout(args.timeout, "--timeout")
    except BadRequest as exc:
        return _error(str(exc))
    config = _target_config(args)

    async def action() -> int:
        async with _open_target(config) as plane:
            item = await plane.submit(
                args.prompt,
                metadata=metadata,
                retry=policy,
                priority=args.priority,
                delay=args.delay,
                not_before=not_before,
                key=args.key,
                labels=labels,
                timeout=timeout,
            )
        print(item.id, flush=True)
        if item.duplicate:
            print(
                f"{PROG}: the key {args.key!r} was already used: that item is "
                f"{item.state.value}; nothing queued",
                file=sys.stderr,
            )
        elif sys.stderr.isatty():
            _say(f"queued; follow it with: {PROG} status{_target_flags(args)}")
        return EXIT_OK

    return _run_one_shot(action)


def _target_flags(args: argparse.Namespace) -> str:
    flags = ""
    for name in ("state_dir", "control_plane", "environment_id"):
        value = getattr(args, name, None)
        if isinstance(value, list):
            value = ",".join(value)
        if value is not None:
            flags += f" --{name.replace('_', '-')} {_shown(str(value))}"
    return flags


def cli_cancel(args: argparse.Namespace) -> int:
    """``cancel``: an operator stop request for one item."""
    config = _target_config(args)
    if _store_missing(config):
        return _error(f"no work item {args.id!r}: {config.state_dir} holds no control plane yet")

    async def action() -> int:
        async with _open_target(config) as plane:
            try:
                item = await plane.request_stop(args.id)
            except Conflict:
                item = await plane.get(args.id)
                outcome = item.outcome.status.value if item.outcome else "no outcome"
                print(f"{item.id}: already stopped ({outcome})")
                return EXIT_OK
        if item.state is WorkState.STOPPED:
            print(f"{item.id}: stopped (it had not started; outcome cancelled)")
        else:
            print(
                f"{item.id}: stopping: the worker serving it stops the session at its next "
                "lease heartbeat and records the outcome cancelled"
            )
        return EXIT_OK

    return _run_one_shot(action)


def cli_retry(args: argparse.Namespace) -> int:
    """``retry``: put a stopped item back in the queue with fresh attempts."""
    config = _target_config(args)
    if _store_missing(config):
        return _error(f"no work item {args.id!r}: {config.state_dir} holds no control plane yet")

    async def action() -> int:
        async with _open_target(config) as plane:
            try:
                item = await plane.retry(args.id)
            except Conflict:
                item = await plane.get(args.id)
                return _error(f"{item.id} is {item.state.value}, not stopped: nothing to retry")
        print(f"{item.id}: queued again with fresh attempts")
        return EXIT_OK

    return _run_one_shot(action)


# --------------------------------------------------------------------------- status


def _item_entry(item: WorkItem) -> dict[str, Any]:
    outcome = item.outcome
    return {
        "id": item.id,
        "state": item.state.value,
        "outcome": (
            {
                "status": outcome.status.value,
                "exit_code": outcome.exit_code,
                "reason": outcome.reason,
                "duration": outcome.duration,
                "result": outcome.result[:200] if outcome.result else outcome.result,
            }
            if outcome is not None
            else None
        ),
        "attempts": item.attempts,
        "retry": (
            {
                "max_attempts": item.retry.max_attempts,
                "backoff": item.retry.backoff,
                "backoff_max": item.retry.backoff_max,
            }
            if item.retry is not None
            else None
        ),
        "dead": item.dead,
        "priority": item.priority,
        "key": item.key,
        "labels": list(item.labels),
        "timeout": item.timeout,
        "not_before": item.not_before,
        "history": [
            {
                "attempt": a.attempt,
                "status": a.outcome.status.value,
                "exit_code": a.outcome.exit_code,
                "reason": a.outcome.reason,
                "ended_at": a.ended_at,
                "retry_at": a.retry_at,
            }
            for a in item.history
        ],
        "worker_id": item.worker_id,
        "created_at": item.created_at,
        "stopped_at": item.stopped_at,
        "metadata": dict(item.metadata),
        "prompt": item.data.prompt[:200],
    }


async def _newest_items(plane: ControlPlane, limit: int) -> list[WorkItem]:
    """The newest ``limit`` items, oldest first, with few calls however long the history.

    The control plane pages oldest first; the last page is found by doubling,
    then halving, the page number (``O(log n)`` calls rather than ``n / limit``).
    """
    first = list(await plane.list_work(limit=limit, page=0))
    if len(first) < limit:
        return first
    low, high = 0, 1  # page ``low`` is known full; find the first page that is not
    while len(await plane.list_work(limit=limit, page=high)) == limit:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if len(await plane.list_work(limit=limit, page=middle)) == limit:
            low = middle
        else:
            high = middle
    tail = list(await plane.list_work(limit=limit, page=low)) + list(
        await plane.list_work(limit=limit, page=high)
    )
    return tail[-limit:]


async def _live_worker(config: WorkerConfig) -> tuple[dict[str, Any] | None, str]:
    """The snapshot of the worker serving in the state directory, or why there is none."""
    import httpx

    from .._worker._api import API_FILENAME, read_api_file

    info = read_api_file(config.state_dir)
    if info is None:
        return None, (
            f"No worker's local API in {config.state_dir.absolute()} (no {API_FILENAME}): "
            f"no worker runs here, or it runs with --no-api. Start one with: {PROG}"
        )
    if not info.process_alive():
        return None, (
            f"No worker is running: {API_FILENAME} names process {info.pid}, which has exited "
            "(it was killed before it could tidy up)."
        )
    try:
        async with httpx.AsyncClient(timeout=_API_TIMEOUT) as client:
            response = await client.get(f"{info.url}/status")
            response.raise_for_status()
            document: dict[str, Any] = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        return None, f"The worker's API at {info.url} did not answer: {type(exc).__name__}"
    return document, ""


async def _status_document(config: WorkerConfig, limit: int) -> dict[str, Any]:
    worker, note = await _live_worker(config)
    document: dict[str, Any] = {
        "state_dir": str(config.state_dir.absolute()),
        "control_plane": _shown(config.control_plane) if config.control_plane else "embedded",
        "environment_id": config.environment_id,
        "worker": worker,
        "worker_note": note or None,
        "workers": [],
        "queue": None,
        "items": [],
    }
    if _store_missing(config):
        document["hint"] = (
            f"Nothing here yet: no work was submitted to {config.state_dir.absolute()}. "
            f'Try: {PROG} submit "a task"'
        )
        return document
    async with _open_target(config) as plane:
        workers = await plane.list_workers()
        stats = await plane.stats()
        newest = await _newest_items(plane, limit)
        running: list[WorkItem] = []
        for state in (WorkState.STARTING, WorkState.ACTIVE, WorkState.STOPPING):
            running.extend(await plane.list_work(state=state, limit=limit))
    shown = {item.id: item for item in newest}
    for item in running:
        shown.setdefault(item.id, item)
    items = sorted(shown.values(), key=lambda i: (i.created_at or 0.0, i.id))
    document["workers"] = [
        {
            "worker_id": w.worker_id,
            "status": w.status.value,
            "active_tasks": w.active_tasks,
            "labels": worker_labels(w),
            "runtime_state": w.runtime_state,
            "sample_error": w.sample_error,
            "error_rate": w.error_rate,
            "last_heartbeat_at": w.last_heartbeat_at,
            "registered_at": w.registered_at,
        }
        for w in workers
    ]
    document["queue"] = {
        "depth": stats.depth,
        "pending": stats.pending,
        "oldest_queued_at": stats.oldest_queued_at,
        "workers_polling": stats.workers_polling,
    }
    document["items"] = [_item_entry(i) for i in items]
    return document


def _print_dead_letter(config: WorkerConfig, limit: int, *, as_json: bool) -> int:
    """``status --dead``: the items stopped out of attempts, with their last outcome."""
    dead: list[WorkItem] = []

    async def action() -> int:
        if not _store_missing(config):
            async with _open_target(config) as plane:
                dead.extend(await plane.list_work(dead=True, limit=limit))
        return EXIT_OK

    code = _run_one_shot(action)
    if code != EXIT_OK:
        return code
    if as_json:
        print(json.dumps({"dead": [_item_entry(item) for item in dead]}, indent=2))
        return EXIT_OK
    if not dead:
        print("dead letter: empty")
        return EXIT_OK
    print(f"dead letter: {len(dead)} item(s); bring one back with: {PROG} retry ID")
    for item in dead:
        outcome = item.outcome
        last = "no outcome" if outcome is None else outcome.status.value
        if outcome is not None and outcome.exit_code is not None:
            last += f" (exit {outcome.exit_code})"
        if outcome is not None and outcome.reason:
            last += f": {outcome.reason[:80]}"
        print(f"  {item.id}  {item.attempts} attempt(s)  {last}")
    return EXIT_OK


def cli_status(args: argparse.Namespace) -> int:
    """``status``: the live tree (from the worker's API) and the control plane's view."""
    if args.limit < 1:
        return _error(f"--limit must be at least 1, got {args.limit}")
    config = _target_config(args)
    limit = min(args.limit, 1000)
    if args.dead:
        return _print_dead_letter(config, limit, as_json=args.json)
    document: dict[str, Any] = {}

    async def action() -> int:
        document.update(await _status_document(config, limit))
        return EXIT_OK

    code = _run_one_shot(action)
    if code != EXIT_OK:
        return code
    if args.json:
        print(json.dumps(document, indent=2))
        return EXIT_OK
    from ._status_view import render_status

    render_status(document, now=time.time())
    return EXIT_OK


# ----------------------------------------------------------------------- serve, demo


def cli_serve(args: argparse.Namespace) -> int:
    """``serve``: see ``supervisor._cli._serve``."""
    from ._serve import cli_serve as serve

    return serve(args)


def cli_demo(args: argparse.Namespace) -> int:
    """``demo``: see ``supervisor._demo``."""
    from ._demo import cli_demo as demo

    return demo(args)


def cli_delegate(args: argparse.Namespace) -> int:
    """``delegate``: see ``supervisor._cli._delegate``."""
    from ._delegate import cli_delegate as delegate

    return delegate(args)


def cli_migrate(args: argparse.Namespace) -> int:
    """``python -m supervisor migrate``: apply pending migrations; exit 1 if it cannot."""
    from ..controlplane._store._dburl import is_postgres_url, resolve_database_url

    if not is_postgres_url(args.database):
        return _error("migrate needs a postgresql:// URL")
    from ..controlplane._store._postgres import migrate

    try:
        url = resolve_database_url(args.database)
        found, now = migrate(url)
    except ControlPlaneError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    where = url.display
    if found == now:
        print(f"{where}: control-plane schema already at version {now}")
    else:
        print(f"{where}: control-plane schema migrated from version {found} to {now}")
    return 0


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cli_run,
    "submit": cli_submit,
    "status": cli_status,
    "cancel": cli_cancel,
    "retry": cli_retry,
    "serve": cli_serve,
    "migrate": cli_migrate,
    "demo": cli_demo,
    "delegate": cli_delegate,
}
