"""``python -m supervisor serve``: the reference control-plane server on its own.

It serves the embedded store of ``--state-dir`` (or, with ``--database``, the
fleet's PostgreSQL database, any number of replicas at once) over HTTP until
SIGINT or SIGTERM (the server itself is ``supervisor.controlplane._server``; this is the
command around it: flags, the key from the environment, exit codes).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Final

import trio

from .._base._exceptions import ConfigError
from .._base._logging import configure_logging
from ..controlplane._connect import store_file
from ..controlplane._exceptions import ControlPlaneError
from ..controlplane._keys import KEY_ENV, KEY_FILE_ENV, KeyProvider, key_provider_from_env
from ..controlplane._server import DEFAULT_PORT, require_key, serve_control_plane
from ..controlplane._store import SQLiteStore, Store
from ._common import PROG
from ._policies import add_environment_arguments

__all__ = ["add_serve_arguments", "cli_serve"]

logger = logging.getLogger("supervisor.controlplane.server")

_COMMAND: Final = f"{PROG} serve"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` sub-command's flags (the key comes from the environment, never a flag)."""
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s; use 0.0.0.0 to serve other machines)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port to listen on (default: %(default)s; 0 picks a free port); "
        "the base URL is printed on stdout once listening",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".supervisor"),
        help="directory holding the SQLite store (default: %(default)s); created if missing",
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        help="serve the fleet store in PostgreSQL at URL (postgresql://...) instead of "
        "--state-dir's SQLite file; any number of replicas may serve one database. The "
        "password comes from SUPERVISOR_DATABASE_URL_FILE or PGPASSFILE, never this flag",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines on stderr: readable text or JSON lines (default: %(default)s)",
    )
    add_environment_arguments(parser, serve=True)


#: ``serve``'s flag of each environment setting (`EnvironmentSettings` field names).
_SETTING_FLAGS: Final = {
    "max_queue_depth": "--max-queue-depth",
    "retention": "--retention",
    "max_attempts": "--max-attempts",
    "backoff": "--backoff",
    "backoff_max": "--backoff-max",
}


def environment_settings(args: argparse.Namespace) -> dict[str, int | float | None]:
    """The environment policies given as flags, validated (``ConfigError`` names the flag)."""
    from ..controlplane._exceptions import BadRequest
    from ..controlplane._store._common import check_settings

    given = {
        name: getattr(args, name)
        for name in _SETTING_FLAGS
        if getattr(args, name, None) is not None
    }
    for name, value in given.items():
        try:
            check_settings({name: value})
        except BadRequest as exc:
            raise ConfigError(exc.message, key=_SETTING_FLAGS[name]) from None
    return dict(given)


def _open_store(state_dir: Path) -> SQLiteStore:
    path = store_file(state_dir, create=True, setting="--state-dir")
    try:
        return SQLiteStore(path)
    except ControlPlaneError as exc:
        raise ConfigError(f"cannot open the store: {exc}", key="--state-dir") from None


def _open_database(url: str) -> Store:
    from ..controlplane._store._dburl import is_postgres_url

    if not is_postgres_url(url):
        raise ConfigError("expected a postgresql:// URL", key="--database")
    from ..controlplane._store._postgres import PostgresStore

    try:
        return PostgresStore(url)
    except ControlPlaneError as exc:
        raise ConfigError(f"cannot open the database: {exc}", key="--database") from None


def _serve_config(args: argparse.Namespace) -> tuple[KeyProvider, Store]:
    """Everything ``serve`` needs before it binds, or the ``ConfigError`` that stops it."""
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"must be between 0 and 65535, got {args.port}", key="--port")
    environment_settings(args)  # refused before anything is opened
    keys = key_provider_from_env(os.environ, watch=True)
    if keys is None:
        raise ConfigError(
            f"no environment key configured: set {KEY_ENV} or {KEY_FILE_ENV}; "
            "the control plane refuses to start without one"
        )
    require_key(keys)
    database = getattr(args, "database", None)
    if database:
        return keys, _open_database(database)
    return keys, _open_store(Path(args.state_dir))


async def _serve_until_signalled(
    store: Store,
    host: str,
    port: int,
    keys: KeyProvider,
    settings: dict[str, int | float | None] | None = None,
) -> int:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                url = await nursery.start(
                    partial(
                        serve_control_plane,
                        store,
                        host=host,
                        port=port,
                        key_provider=keys,
                        environment_settings=settings,
                    )
                )
            except ConfigError as exc:
                print(f"{_COMMAND}: error: {exc}", file=sys.stderr)
                return 2
            print(url, flush=True)
            async for signum in signals:
                logger.info("received %s; stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    return 0


def cli_serve(args: argparse.Namespace) -> int:
    """``python -m supervisor serve``: serve the state directory's store until SIGINT/SIGTERM.

    The environment policies given as flags (``--max-queue-depth``, ``--retention``,
    ``--max-attempts``, ``--backoff``, ``--backoff-max``) are written at start to every
    environment of the store and given to environments created later through this
    server; flags not given leave the stored values alone. Precedence: a per-item
    submit value, then the environment's stored value (the last writer's: a ``serve``
    replica starting, a worker on its own store, ``configure_environment``).

    Returns:
        0 after a clean stop; 2 for a configuration error (no key, unreadable key
        file, port in use, unusable state directory, a bad policy), with the reason
        on stderr.
    """
    try:
        keys, store = _serve_config(args)
    except ConfigError as exc:
        print(f"{_COMMAND}: error: {exc}", file=sys.stderr)
        return 2
    # The redaction filter is a second line of defence: nothing here logs the key.
    configure_logging(getattr(args, "log_format", "text"), secrets=[keys.current()])
    try:
        return trio.run(
            _serve_until_signalled, store, args.host, args.port, keys, environment_settings(args)
        )
    finally:
        store.close()
