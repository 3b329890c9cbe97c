"""Command line: ``python -m supervisor [run|submit|status|cancel|serve] ...``.

``python -m supervisor`` with no arguments is ``run`` on the embedded control
plane in ``./.supervisor/``.

Exit codes: 0 clean stop, 1 the supervisor gave up (restart budget spent),
2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from ._config import DEFAULT_AGENT, WorkerConfig
from ._exceptions import ConfigError, ControlPlaneError, RestartIntensityExceeded
from ._logging import configure_logging
from ._settings import config_from_layers, read_environment, read_toml

__all__ = ["main"]

EXIT_OK = 0
EXIT_GAVE_UP = 1
EXIT_USAGE = 2

_COMMANDS = ("run", "submit", "status", "cancel", "serve")


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage, which is our contract too; keep its messages."""


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="state directory of the embedded control plane (default: ./.supervisor)",
    )
    parser.add_argument(
        "--control-plane",
        metavar="URL",
        default=None,
        help="a remote control plane instead of the embedded one; its key comes from "
        "SUPERVISOR_ENVIRONMENT_KEY or SUPERVISOR_ENVIRONMENT_KEY_FILE",
    )
    parser.add_argument("--environment-id", default=None, help="the environment (default: default)")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="a TOML file of settings (keys as below with underscores, top level or [worker]); "
        "SUPERVISOR_* environment variables override it, flags override both",
    )
    _add_target_arguments(parser)
    parser.add_argument(
        "--max-concurrency", type=int, metavar="N", help="sessions at once (default: 4)"
    )
    parser.add_argument(
        "--agent",
        metavar="CMD",
        help='the agent command, e.g. "claude -p {prompt} --output-format json": split like a '
        "shell but never run by one; {prompt}, {work_id} and {session_id} are substituted per "
        "argument; or package.module:function for an in-process async agent "
        "(default: the built-in demo agent)",
    )
    parser.add_argument(
        "--workspace",
        choices=("none", "git"),
        help="none: a fresh temporary directory per session; git: a local clone of --base-repo",
    )
    parser.add_argument("--base-repo", metavar="PATH", help="the repository git workspaces clone")
    parser.add_argument("--api-host", help="address of the local HTTP API (default: 127.0.0.1)")
    parser.add_argument(
        "--api-port",
        type=int,
        help="port of the local HTTP API (default 0: a free one; "
        "its URL goes to STATE_DIR/api.json)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        metavar="S",
        help="lease ttl to ask the control plane for, in seconds (default: 60)",
    )
    parser.add_argument(
        "--session-timeout",
        type=float,
        metavar="S",
        help="seconds a session may execute (not counting the wait for a slot; default: none)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), help="log lines for people or for machines"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds running sessions get to finish (default: 30)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m supervisor",
        description="A Trio supervisor for self-hosted agent workers. "
        "With no command it runs a worker on the embedded control plane in ./.supervisor.",
        epilog="Exit codes: 0 clean stop, 1 the supervisor gave up, 2 bad usage or configuration.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a worker (the default)",
        description="Claim work, keep leases, run agents. SIGTERM/SIGINT drains: no new claims, "
        "running sessions get --drain-timeout to finish, then they are cancelled; a second "
        "signal cancels at once.",
    )
    _add_run_arguments(run)

    submit = sub.add_parser(
        "submit",
        help="queue a session",
        description="Queue a session; prints the new item's id. "
        "Works whether or not a worker runs.",
    )
    submit.add_argument("prompt", help="the task for the agent")
    _add_target_arguments(submit)
    submit.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="K=V",
        help="a metadata entry (repeatable)",
    )

    status = sub.add_parser(
        "status", help="show workers and the work queue", description="Workers and the work queue."
    )
    _add_target_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--limit", type=int, default=50, help="items to show (default: 50)")

    cancel = sub.add_parser(
        "cancel",
        help="ask the worker serving an item to stop it",
        description="Operator stop: the owning worker's next heartbeat answers 'stopping'.",
    )
    cancel.add_argument("id", help="the work item id")
    _add_target_arguments(cancel)

    from .controlplane._server import add_serve_arguments

    serve = sub.add_parser(
        "serve",
        help="run the reference control plane (HTTP) alone",
        description="Serve the embedded control-plane store over HTTP for remote workers. "
        "The key comes from SUPERVISOR_ENVIRONMENT_KEY or SUPERVISOR_ENVIRONMENT_KEY_FILE.",
    )
    add_serve_arguments(serve)
    return parser


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help")):
        args_list.insert(0, "run")
    parser = build_parser()
    args = parser.parse_args(args_list)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": cli_run,
        "submit": cli_submit,
        "status": cli_status,
        "cancel": cli_cancel,
    }
    if args.command == "serve":
        from .controlplane._server import cli_serve

        return cli_serve(args)
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        return _error(str(exc))


# ---------------------------------------------------------------------- run


def _flag_layer(args: argparse.Namespace) -> dict[str, Any]:
    names = [
        "state_dir",
        "control_plane",
        "environment_id",
        "max_concurrency",
        "agent",
        "workspace",
        "base_repo",
        "api_host",
        "api_port",
        "lease_ttl",
        "session_timeout",
        "log_format",
        "drain_timeout",
    ]
    return {name: getattr(args, name, None) for name in names}


def load_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> WorkerConfig:
    """TOML file < ``SUPERVISOR_*`` environment < flags."""
    file_layer = read_toml(args.config) if getattr(args, "config", None) else {}
    env_layer = read_environment(os.environ if environ is None else environ)
    return config_from_layers(file_layer, env_layer, _flag_layer(args))


def _banner(config: WorkerConfig) -> str:
    where = (
        f"embedded control plane in {config.state_dir}"
        if config.embedded
        else f"control plane {config.control_plane}"
    )
    agent = "the built-in demo agent" if config.agent == DEFAULT_AGENT else config.agent
    target = "" if config.embedded else f" --control-plane {config.control_plane}"
    if config.embedded and config.state_dir != Path(".supervisor"):
        target = f" --state-dir {config.state_dir}"
    return "\n".join(
        [
            f"supervisor worker {config.worker_id} is running",
            f"  work comes from:  {where} (environment {config.environment_id!r})",
            f"  agent:            {agent}",
            f"  sessions at once: {config.max_concurrency}",
            f"  session logs:     {config.state_dir / 'logs'}",
            f'  submit work:      python -m supervisor submit{target} "describe this repository"',
            f"  watch:            python -m supervisor status{target}",
            f"  stop:             Ctrl-C (running sessions get {config.drain_timeout:g}s to finish;"
            " a second Ctrl-C cancels them)",
        ]
    )


def cli_run(args: argparse.Namespace) -> int:
    config = load_config(args)
    secrets = [config.environment_key] if config.environment_key else []
    configure_logging(config.log_format, secrets=secrets)
    from ._worker import Worker

    try:
        worker = Worker(config)
    except ConfigError as exc:
        return _error(str(exc))
    try:
        trio.run(_run_until_signalled, worker, config)
    except ConfigError as exc:
        return _error(str(exc))
    except RestartIntensityExceeded as exc:
        print(f"supervisor gave up: {exc}", file=sys.stderr)
        return EXIT_GAVE_UP
    return EXIT_OK


async def _run_until_signalled(worker: Any, config: WorkerConfig) -> None:
    from ._groups import collapse_group, raise_saving_context

    try:
        async with trio.open_nursery() as nursery:

            async def run_worker(*, task_status: trio.TaskStatus[None]) -> None:
                try:
                    await worker.run(task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()

            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                await nursery.start(run_worker)
                print(_banner(config), flush=True)
                count = 0
                async for signum in signals:
                    count += 1
                    name = signal.Signals(signum).name
                    if count == 1:
                        print(
                            f"{name}: draining: no new work; running sessions get "
                            f"{config.drain_timeout:g}s (send it again to cancel them now)",
                            file=sys.stderr,
                            flush=True,
                        )
                        nursery.start_soon(worker.drain)
                    else:
                        print(
                            f"{name}: cancelling running sessions now", file=sys.stderr, flush=True
                        )
                        nursery.cancel_scope.cancel()
                        break
    except BaseExceptionGroup as group:
        raise_saving_context(collapse_group(group))


# ------------------------------------------------------------ one-shot commands


def _target_config(args: argparse.Namespace) -> WorkerConfig:
    env = read_environment(os.environ)
    flags = {
        "state_dir": args.state_dir,
        "control_plane": args.control_plane,
        "environment_id": args.environment_id,
    }
    layer = {
        k: v
        for k, v in env.items()
        if k
        in {
            "state_dir",
            "control_plane",
            "environment_id",
            "environment_key",
            "environment_key_file",
        }
    }
    return config_from_layers(layer, flags)


@contextlib.asynccontextmanager
async def _open_target(config: WorkerConfig) -> AsyncIterator[Any]:
    if config.embedded:
        from .controlplane._embedded import open_embedded_control_plane

        async with open_embedded_control_plane(
            config.state_dir, environment_id=config.environment_id
        ) as plane:
            yield plane
        return
    from .controlplane._http import HttpControlPlane
    from .controlplane._keys import FileKey, KeyProvider, StaticKey

    key: KeyProvider
    if config.environment_key_file is not None:
        key = FileKey(config.environment_key_file)
    elif config.environment_key:
        key = StaticKey(config.environment_key)
    else:
        raise ConfigError(
            "set SUPERVISOR_ENVIRONMENT_KEY or SUPERVISOR_ENVIRONMENT_KEY_FILE for --control-plane",
            key="environment_key",
        )
    assert config.control_plane is not None
    async with HttpControlPlane.open(
        config.control_plane, environment_id=config.environment_id, key=key
    ) as plane:
        yield plane


def _one_shot(args: argparse.Namespace, action: Callable[[Any], Any]) -> int:
    config = _target_config(args)

    async def go() -> None:
        async with _open_target(config) as plane:
            await action(plane)

    try:
        trio.run(go)
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_GAVE_UP if not isinstance(exc, ConfigError) else EXIT_USAGE
    return EXIT_OK


def cli_submit(args: argparse.Namespace) -> int:
    metadata: dict[str, str] = {}
    for entry in args.metadata:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            return _error(f"--metadata expects KEY=VALUE, got {entry!r}")
        metadata[key] = value
    if not args.prompt.strip():
        return _error("the prompt is empty")

    async def action(plane: Any) -> None:
        item = await plane.submit(args.prompt, metadata=metadata)
        print(item.id)

    return _one_shot(args, action)


def cli_cancel(args: argparse.Namespace) -> int:
    async def action(plane: Any) -> None:
        item = await plane.request_stop(args.id)
        print(f"{item.id}: {item.state.value}")

    return _one_shot(args, action)


def cli_status(args: argparse.Namespace) -> int:
    async def action(plane: Any) -> None:
        items = await plane.list_work(limit=max(1, min(args.limit, 1000)))
        workers = await plane.list_workers()
        stats = await plane.stats()
        data: dict[str, Any] = {
            "workers": [
                {
                    "worker_id": w.worker_id,
                    "status": w.status.value,
                    "active_tasks": w.active_tasks,
                    "runtime_state": w.runtime_state,
                }
                for w in workers
            ],
            "queue": {
                "depth": stats.depth,
                "pending": stats.pending,
                "workers_polling": stats.workers_polling,
            },
            "items": [
                {
                    "id": i.id,
                    "state": i.state.value,
                    "attempts": i.attempts,
                    "worker_id": i.worker_id,
                    "outcome": (
                        {
                            "status": i.outcome.status.value,
                            "exit_code": i.outcome.exit_code,
                            "reason": i.outcome.reason,
                            "duration": i.outcome.duration,
                        }
                        if i.outcome
                        else None
                    ),
                    "prompt": i.data.prompt[:80],
                }
                for i in items
            ],
        }
        if args.json:
            print(json.dumps(data, indent=2))
            return
        print(f"queue: {stats.depth} queued, {stats.pending} in progress")
        print("workers:")
        for w in data["workers"] or [{"worker_id": "(none)", "status": "", "active_tasks": ""}]:
            print(f"  {w['worker_id']:<40} {w['status']:<12} {w['active_tasks']}")
        print("items:")
        for i in data["items"]:
            outcome = i["outcome"]["status"] if i["outcome"] else ""
            print(f"  {i['id']:<36} {i['state']:<9} {outcome:<10} {i['prompt']}")

    return _one_shot(args, action)
