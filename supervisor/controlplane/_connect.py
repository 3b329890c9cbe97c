"""Open a control plane from where it is: the one place a location becomes a plane.

The worker, the one-shot commands (``submit``, ``status``, ``cancel``) and an
agent's session client all start from the same two facts: *where* the control
plane is and *how to prove* the right to use it. This module turns them into an
open `ControlPlane` and closes it afterwards:

- no location, or a path: the embedded control plane. A path is either a state
  directory (the store is ``controlplane.sqlite3`` inside it) or the store file
  itself, which is what a session credential names.
- a URL: a remote control plane, chosen by the URL's scheme in `_REMOTE`:
  ``http``/``https`` (one served replica, or several comma-separated, tried in
  turn) or ``postgresql``/``postgres`` (the fleet database, used directly). A new
  kind of remote plane is one more entry there.

A remote plane needs the environment key (or a session credential); the
embedded one does not (whoever can write the file can do anything anyway).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Final

import attrs
import trio

from .._base._exceptions import ConfigError
from ._embedded import STORE_FILENAME, EmbeddedControlPlane
from ._keys import FileKey, KeyProvider, StaticKey
from ._protocol import ControlPlane
from ._store import DEFAULT_ENVIRONMENT_ID

__all__ = ["DEFAULT_STATE_DIR", "open_control_plane", "remote_scheme", "store_file"]

#: Where the embedded control plane lives when no location is given.
DEFAULT_STATE_DIR: Final = Path(".supervisor")
#: How long closing an embedded plane may take when the block is cancelled.
_CLOSE_TIMEOUT: Final = 30.0


@attrs.frozen
class _Request:
    """What a caller asked for, as the openers see it."""

    location: str
    environment_id: str
    key: KeyProvider | None
    create: bool
    setting: str
    missing_key: str


_Opener = Callable[[_Request], AbstractAsyncContextManager[ControlPlane]]


@asynccontextmanager
async def _open_http(request: _Request) -> AsyncIterator[ControlPlane]:
    if request.key is None:
        raise ConfigError(request.missing_key, key="environment_key")
    # Imported here: settings validation imports this module, and needs no httpx.
    from ._http import HttpControlPlane

    async with HttpControlPlane.open(
        request.location, environment_id=request.environment_id, key=request.key
    ) as plane:
        yield plane


@asynccontextmanager
async def _open_postgres(request: _Request) -> AsyncIterator[ControlPlane]:
    # The fleet database itself, used directly: its password comes with the URL, from
    # SUPERVISOR_DATABASE_URL_FILE or from PGPASSFILE, never from the environment key.
    from ._store._postgres import open_postgres_control_plane

    async with open_postgres_control_plane(
        request.location, environment_id=request.environment_id
    ) as plane:
        yield plane


#: The remote kinds of control plane by URL scheme: the single dispatch point.
_REMOTE: Final[dict[str, _Opener]] = {
    "http": _open_http,
    "https": _open_http,
    "postgresql": _open_postgres,
    "postgres": _open_postgres,
}


def remote_scheme(location: str) -> str | None:
    """The scheme of ``location`` when it is a URL of a control plane this package can open."""
    scheme, sep, _ = location.partition("://")
    scheme = scheme.lower()
    return scheme if sep and scheme in _REMOTE else None


def store_file(location: str | os.PathLike[str], *, create: bool, setting: str) -> Path:
    """The embedded store's file that a path names: the file itself, or the one in a directory.

    A missing directory is created when ``create`` (a new, empty store), else it is a
    ``ConfigError`` naming ``setting``. Blocking: call it in a thread from async code.
    """
    path = Path(location)
    if path.is_file():
        return path
    if path.is_dir() and (path / STORE_FILENAME).is_file():
        return path / STORE_FILENAME
    if not create:
        raise ConfigError(f"no control-plane store at {str(path)!r}", key=setting)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the state directory {str(path)!r}: {exc.strerror or exc}",
            key=setting,
        ) from None
    return path / STORE_FILENAME


@asynccontextmanager
async def _open_embedded(request: _Request) -> AsyncIterator[ControlPlane]:
    def open_it() -> EmbeddedControlPlane:
        path = store_file(request.location, create=request.create, setting=request.setting)
        return EmbeddedControlPlane(path, environment_id=request.environment_id)

    plane = await trio.to_thread.run_sync(open_it)
    try:
        yield plane
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            await plane.aclose()


def _key_provider(
    key: str | KeyProvider | None, key_file: str | os.PathLike[str] | None
) -> KeyProvider | None:
    if key_file is not None:
        provider = FileKey(key_file)
        provider.current()  # an unreadable file is a clear ConfigError now, not a 401 later
        return provider
    if isinstance(key, str):
        return StaticKey(key) if key else None
    return key


@asynccontextmanager
async def open_control_plane(
    location: str | os.PathLike[str] | None = None,
    *,
    environment_id: str = DEFAULT_ENVIRONMENT_ID,
    key: str | KeyProvider | None = None,
    key_file: str | os.PathLike[str] | None = None,
    create: bool = True,
    setting: str = "control_plane",
    missing_key: str = "a remote control plane needs an environment key",
) -> AsyncIterator[ControlPlane]:
    """The control plane at ``location``, open for the block and closed after it.

    Args:
        location: ``None`` for the embedded plane in ``./.supervisor``; a state
            directory or a store file for the embedded plane there; a URL whose
            scheme `remote_scheme` knows for a remote plane.
        environment_id: the environment (a separate queue) to use.
        key: the environment key (or a session credential) for a remote plane, or a
            provider of it; ignored by the embedded plane.
        key_file: a file holding the key; read once now, so that an unreadable file
            fails here with its name rather than as a 401 later. Wins over ``key``.
        create: whether a missing state directory is created (and with it a new,
            empty store). ``False`` for a caller that must find an existing store.
        setting: the setting named by a ``ConfigError`` about the location.
        missing_key: the message when a remote plane has no key: each caller names
            the settings its user can change.

    Raises:
        ConfigError: a URL of a scheme no control plane here speaks, no key for a
            remote plane, an unreadable key file, no store at
            the path while ``create`` is false, or a state directory that cannot be
            created.
    """
    where = os.fspath(location) if location is not None else os.fspath(DEFAULT_STATE_DIR)
    scheme = remote_scheme(where)
    if scheme is None and "://" in where:
        known = ", ".join(f"{name}://" for name in _REMOTE)
        raise ConfigError(f"expected a path or a {known} URL, got {where!r}", key=setting)
    request = _Request(
        location=where,
        environment_id=environment_id,
        key=_key_provider(key, key_file) if scheme is not None else None,
        create=create,
        setting=setting,
        missing_key=missing_key,
    )
    opener = _REMOTE[scheme] if scheme is not None else _open_embedded
    async with opener(request) as plane:
        yield plane
