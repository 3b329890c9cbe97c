"""One way to put an exception into a log line, an event or a status report.

The tree's events, its start errors, the lease keeper's log lines and the
worker's presence report all name a failure by its type and message. They
used to do it four slightly different ways; the differences that matter
(a status code, secrets to hide, one line of bounded length) are options here.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["describe_exception"]


def describe_exception(
    exc: BaseException | None,
    *,
    status: bool = False,
    redact: Iterable[str] = (),
    one_line: bool = False,
    limit: int | None = None,
) -> str:
    """``"TypeName: message"``, or ``"TypeName"`` when the message is empty.

    Args:
        exc: the exception; ``None`` gives ``""`` (an exit without one).
        status: add the exception's ``status_code`` attribute, when it has one, as
            ``"TypeName (503): message"``: the HTTP status says more than most messages.
        redact: strings (fencing tokens, credentials) replaced by ``<token>`` in the
            message: what is described may be logged or sent to the control plane.
        one_line: collapse every run of whitespace (newlines too) into one space, for
            fields that are shown in one table cell.
        limit: the longest result; a longer one ends in ``"..."`` within the limit.
    """
    if exc is None:
        return ""
    name = type(exc).__name__
    code = getattr(exc, "status_code", None) if status else None
    if code is not None:
        name = f"{name} ({code})"
    message = str(exc)
    for secret in redact:
        if secret:
            message = message.replace(secret, "<token>")
    text = f"{name}: {message}" if message else name
    if one_line:
        text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    return text
