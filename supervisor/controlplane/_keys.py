"""Environment keys: where the bearer token comes from, without ever showing it.

A ``KeyProvider`` answers two questions: what is the key now (``current``),
and has it changed on disk (``reload``). The HTTP client calls ``reload`` once
after a 401, so an operator can rotate the key by rewriting the key file
without restarting workers. The reference server watches its key file
(``FileKey(path, watch=True)``), so the server's side of a rotation needs no
restart either, and the old key stops working with the next request.

No provider ever puts the key in a ``repr``, a log line or an exception message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from .._base._exceptions import ConfigError

__all__ = [
    "KEY_ENV",
    "KEY_FILE_ENV",
    "FileKey",
    "KeyProvider",
    "StaticKey",
    "as_key_provider",
    "check_key_syntax",
    "key_provider_from_env",
]

#: The environment variable holding the environment key itself.
KEY_ENV = "SUPERVISOR_ENVIRONMENT_KEY"
#: The environment variable naming a file that holds the key (re-read on rotation).
KEY_FILE_ENV = "SUPERVISOR_ENVIRONMENT_KEY_FILE"


@runtime_checkable
class KeyProvider(Protocol):
    """A source of the environment key."""

    def current(self) -> str:
        """The key to use now (may be empty when none is configured).

        Raises:
            ConfigError: the key cannot be read (for example an unreadable key file).
        """
        ...

    def reload(self) -> bool:
        """Read the key again from its source; ``True`` when it changed.

        Raises:
            ConfigError: the source cannot be read.
        """
        ...


class StaticKey:
    """A key fixed at construction (``reload`` never changes it).

    Args:
        key: the environment key.
    """

    __slots__ = ("_key",)

    def __init__(self, key: str) -> None:
        self._key = key

    def current(self) -> str:
        return self._key

    def reload(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "StaticKey(<redacted>)"


class FileKey:
    """A key kept in a file, read on first use and again on every ``reload``.

    Surrounding whitespace (a trailing newline from ``echo``) is stripped.

    Args:
        path: the key file.
        watch: also re-read the file whenever ``current`` sees that it changed
            (inode, size or modification time). A server wants this: a key
            rotated out on disk must stop working at once, not at the next
            mismatch. A client leaves it off and re-reads after a 401 instead,
            which costs nothing on the happy path.
    """

    __slots__ = ("_key", "_path", "_signature", "_watch")

    def __init__(self, path: str | os.PathLike[str], *, watch: bool = False) -> None:
        self._path = Path(path)
        self._watch = watch
        self._key: str | None = None
        self._signature: tuple[int, int, int] | None = None

    @property
    def path(self) -> Path:
        return self._path

    def _fail(self, exc: OSError | UnicodeDecodeError) -> ConfigError:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return ConfigError(
            f"cannot read the environment key file {str(self._path)!r}: {reason}",
            key=KEY_FILE_ENV,
        )

    def _stat(self) -> tuple[int, int, int]:
        try:
            info = self._path.stat()
        except OSError as exc:
            raise self._fail(exc) from None
        return (info.st_ino, info.st_size, info.st_mtime_ns)

    def _read(self) -> str:
        signature = self._stat()
        try:
            key = self._path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise self._fail(exc) from None
        self._signature = signature
        return key

    def current(self) -> str:
        if self._key is None or (self._watch and self._stat() != self._signature):
            self._key = self._read()
        return self._key

    def reload(self) -> bool:
        fresh = self._read()
        changed = fresh != self._key
        self._key = fresh
        return changed

    def __repr__(self) -> str:
        return f"FileKey({str(self._path)!r}{', watch=True' if self._watch else ''})"


def as_key_provider(key: str | KeyProvider) -> KeyProvider:
    """Accept a plain string wherever a provider is expected."""
    if isinstance(key, str):
        return StaticKey(key)
    if isinstance(key, KeyProvider):
        return key
    raise TypeError(f"expected a key string or a KeyProvider, got {type(key).__name__}")


def check_key_syntax(key: str) -> str | None:
    """Why ``key`` cannot travel in an ``Authorization`` header, or ``None`` when it can.

    Checked before sending, because an HTTP library that rejects a header value
    tends to quote the value in its error message.
    """
    if not key:
        return "the environment key is empty"
    if any(not ("\x21" <= char <= "\x7e") for char in key):
        return "the environment key must be printable ASCII without spaces"
    return None


def key_provider_from_env(environ: Mapping[str, str], *, watch: bool = False) -> KeyProvider | None:
    """The key configured by ``SUPERVISOR_ENVIRONMENT_KEY`` or ``..._KEY_FILE``, if any.

    The file form is preferred by operators because the key then never sits in
    a process environment that children inherit; it is also the form that can be
    rotated without a restart.

    Args:
        environ: the process environment (or a test's stand-in).
        watch: passed to ``FileKey`` (a server sets it; see there).

    Returns:
        A ``StaticKey`` or ``FileKey``; ``None`` when neither variable is set (or both are empty).

    Raises:
        ConfigError: both variables are set, so which key is meant is ambiguous.
    """
    key = environ.get(KEY_ENV, "")
    path = environ.get(KEY_FILE_ENV, "")
    if key and path:
        raise ConfigError(f"set either {KEY_ENV} or {KEY_FILE_ENV}, not both", key=KEY_ENV)
    if path:
        return FileKey(path, watch=watch)
    if key:
        return StaticKey(key)
    return None
