"""Log output for the command line: readable text, or JSON lines for machines.

A redaction filter replaces every known secret (the environment key, session
credentials) with ``***`` in messages and arguments, as a second line of
defence: no code path is meant to log a secret in the first place. Secrets that
appear while the process runs (a session's credential, handed out with its
work item) are added with :func:`redact_secret` and dropped again when the
session ends, so the filter stays small in a long-running worker.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable

__all__ = ["RedactSecrets", "configure_logging", "redact_secret"]

_REDACTED = "***"
#: The filter ``configure_logging`` installed last (logging itself is process-wide).
_installed: RedactSecrets | None = None


class RedactSecrets(logging.Filter):
    """Replaces known secret values in log records."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = {s for s in secrets if s and len(s) >= 4}

    def add(self, secret: str) -> None:
        if secret and len(secret) >= 4:
            self._secrets.add(secret)

    def discard(self, secret: str) -> None:
        self._secrets.discard(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        cleaned = message
        # A copy: secrets come and go from the Trio thread while other threads log.
        for secret in tuple(self._secrets):
            cleaned = cleaned.replace(secret, _REDACTED)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def configure_logging(
    log_format: str = "text", *, level: int = logging.INFO, secrets: Iterable[str] = ()
) -> RedactSecrets:
    """Send the package's logs to stderr in ``log_format``; returns the redaction filter."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    redact = RedactSecrets(secrets)
    handler.addFilter(redact)
    root = logging.getLogger("supervisor")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    global _installed
    _installed = redact
    return redact


def redact_secret(secret: str | None) -> Callable[[], None]:
    """Keep ``secret`` out of the logs from now on; returns the call that forgets it again.

    Does nothing (and returns a no-op) when logging was not configured by
    :func:`configure_logging`, as in an application that embeds a worker and
    owns its logging.
    """
    redact = _installed
    if redact is None or not secret:
        return _nothing
    redact.add(secret)
    return lambda: redact.discard(secret)


def _nothing() -> None:
    return None
