"""Fencing tokens: how a store mints, compares and refuses them.

Shared by every store so that the rules are one piece of code:

* a token is ``hb.<attempt>.<beat>.<counter>.<random>``: opaque to clients,
  but the store can tell which lease (attempt) a token was minted for;
* tokens are compared as bytes in constant time. ``hmac.compare_digest`` on
  two ``str`` raises ``TypeError`` as soon as one is not ASCII, which a
  client can send; bytes never do;
* a stale token is answered with :class:`FencingConflict`, naming the current
  token only when the stale one was minted for the same lease. Within one
  attempt there is one holder (an ack binds the item to one worker; a new
  holder needs an expiry or a requeue, which start a new attempt), so the
  only client that can present an older token of the current attempt is the
  holder itself, one answer behind: a heartbeat the server processed whose
  answer was lost or abandoned. Naming the token lets it report its outcome
  instead of losing a finished session. A token of an earlier attempt learns
  nothing.
"""

from __future__ import annotations

import hmac
import secrets

from ._exceptions import FencingConflict

__all__ = ["mint_token", "stale_token", "tokens_match"]


def _lease_prefix(attempts: int) -> str:
    return f"hb.{attempts}."


def mint_token(attempts: int, beats: int, counter: int) -> str:
    """A fresh token for beat ``beats`` of attempt ``attempts``.

    ``counter`` keeps tokens distinct even if two beats land in the same clock
    tick; the random tail keeps them unguessable and unique across processes.
    """
    return f"{_lease_prefix(attempts)}{beats}.{counter}.{secrets.token_urlsafe(9)}"


def _as_bytes(token: str) -> bytes:
    # ``surrogatepass``: a lone surrogate must compare unequal, not raise.
    return token.encode("utf-8", "surrogatepass")


def tokens_match(current: str | None, presented: str) -> bool:
    """Constant-time equality of two tokens, whatever characters they hold."""
    if current is None:
        return False
    return hmac.compare_digest(_as_bytes(current), _as_bytes(presented))


def stale_token(
    work_id: str, *, presented: str, current: str | None, attempts: int
) -> FencingConflict:
    """The 412 for ``presented``, naming ``current`` when both are of this lease."""
    same_lease = (
        current is not None
        and current.startswith(_lease_prefix(attempts))
        and presented.startswith(_lease_prefix(attempts))
    )
    return FencingConflict(
        f"stale fencing token for work item {work_id!r}",
        current_token=current if same_lease else None,
    )
