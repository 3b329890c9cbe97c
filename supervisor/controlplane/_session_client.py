"""What a running agent may ask of the control plane, with its session's own credential.

The worker that claims a work item receives the item's session credential (a
secret minted by the control plane for that claim). It hands the credential to
the session's agent in the environment, never the environment key, so that the
agent can delegate a task and exchange messages *for its own session only*:

========================================  =============================================
variable                                  meaning
========================================  =============================================
``SUPERVISOR_SESSION_ID``                 the session (set for every agent)
``SUPERVISOR_SESSION_TOKEN``              the session credential
``SUPERVISOR_SESSION_CONTROL_PLANE``      the control plane's ``http(s)://`` URL, or the
                                          path of the embedded store's SQLite file
``SUPERVISOR_SESSION_ENVIRONMENT_ID``     the environment
========================================  =============================================

Over HTTP the credential is the bearer token, and the reference server accepts
it only on the delegate and message routes of that session, only while the
claim is live (a requeue, a re-claim or a stop voids it). With the embedded
control plane there is no server: `open_session_client` opens the store file
and checks the credential the same way before each call. (Any process that can
write the store file can of course change anything in it; the check keeps an
agent's delegations tied to its own live session, it is not a sandbox.)

``python -m supervisor delegate TASK`` is the command-line form (see
``supervisor._cli._delegate``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Final

import attrs

from .._base._exceptions import ConfigError
from ._connect import open_control_plane
from ._embedded import EmbeddedControlPlane
from ._exceptions import Unauthorized
from ._models import Delegation, SessionMessage
from ._protocol import ControlPlane

__all__ = [
    "SESSION_CONTROL_PLANE_ENV",
    "SESSION_ENVIRONMENT_ENV",
    "SESSION_ID_ENV",
    "SESSION_TOKEN_ENV",
    "SessionClient",
    "SessionCredentials",
    "open_session_client",
    "session_location",
]

SESSION_ID_ENV: Final = "SUPERVISOR_SESSION_ID"
SESSION_TOKEN_ENV: Final = "SUPERVISOR_SESSION_TOKEN"
SESSION_CONTROL_PLANE_ENV: Final = "SUPERVISOR_SESSION_CONTROL_PLANE"
SESSION_ENVIRONMENT_ENV: Final = "SUPERVISOR_SESSION_ENVIRONMENT_ID"


@attrs.frozen
class SessionCredentials:
    """Where a session's control plane is and the credential that works there.

    Attributes:
        session_id: the session the credential belongs to.
        token: the session credential (never in ``repr``).
        control_plane: an ``http(s)://`` URL (or several, comma-separated), or the embedded
            store's file path.
        environment_id: the environment of the session.
    """

    session_id: str
    token: str = attrs.field(repr=False)
    control_plane: str
    environment_id: str = "default"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SessionCredentials:
        """Read the ``SUPERVISOR_SESSION_*`` variables an agent is started with.

        Raises:
            ConfigError: a variable is missing or empty (named; the token's value never is).
        """
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for name in (SESSION_ID_ENV, SESSION_TOKEN_ENV, SESSION_CONTROL_PLANE_ENV):
            value = env.get(name, "").strip()
            if not value:
                raise ConfigError(
                    "not set: this command works inside a session started by a supervisor "
                    "worker, which passes the session's credential to its agent",
                    key=name,
                )
            values[name] = value
        return cls(
            session_id=values[SESSION_ID_ENV],
            token=values[SESSION_TOKEN_ENV],
            control_plane=values[SESSION_CONTROL_PLANE_ENV],
            environment_id=env.get(SESSION_ENVIRONMENT_ENV, "").strip() or "default",
        )

    def to_environ(self) -> dict[str, str]:
        """The variables to give an agent (what `from_environ` reads back)."""
        return {
            SESSION_ID_ENV: self.session_id,
            SESSION_TOKEN_ENV: self.token,
            SESSION_CONTROL_PLANE_ENV: self.control_plane,
            SESSION_ENVIRONMENT_ENV: self.environment_id,
        }


def session_location(plane: ControlPlane) -> str | None:
    """Where an agent can reach ``plane`` with a session credential, if anywhere.

    A control plane of another kind (a test double, a custom implementation)
    has no such place, and its agents get no credential.
    """
    if isinstance(plane, EmbeddedControlPlane):
        if plane.store.wakes_across_processes:
            # A database shared by a fleet is reached with its password, which no agent may see.
            return None
        return os.path.abspath(plane.store.path)
    # Imported here so that a worker on the embedded plane never loads the HTTP client.
    from ._http import HttpControlPlane

    if isinstance(plane, HttpControlPlane):
        return ",".join(plane.base_urls)  # every replica, so the agent can fail over too
    return None


class SessionClient:
    """The calls a session credential allows: delegate, and messages of its own session."""

    def __init__(self, plane: ControlPlane, credentials: SessionCredentials, *, check: bool):
        self._plane = plane
        self._credentials = credentials
        self._check = check

    def __repr__(self) -> str:
        return f"<SessionClient session={self._credentials.session_id!r}>"

    @property
    def session_id(self) -> str:
        return self._credentials.session_id

    async def _verify(self) -> None:
        if not self._check:
            return
        assert isinstance(self._plane, EmbeddedControlPlane)
        creds = self._credentials
        if not await self._plane.verify_session_secret(creds.session_id, creds.token):
            raise Unauthorized(
                f"the session credential is not live for session {creds.session_id!r} "
                "(the session ended, or its lease was lost)"
            )

    async def delegate(self, task: str) -> Delegation:
        """Hand ``task`` to another agent: a new work item linked to this session."""
        await self._verify()
        return await self._plane.delegate(self._credentials.session_id, task)

    async def post_message(self, body: str) -> SessionMessage:
        await self._verify()
        return await self._plane.post_message(self._credentials.session_id, body)

    async def list_messages(self) -> Sequence[SessionMessage]:
        await self._verify()
        return await self._plane.list_messages(self._credentials.session_id)


@contextlib.asynccontextmanager
async def open_session_client(
    credentials: SessionCredentials | None = None,
) -> AsyncIterator[SessionClient]:
    """A `SessionClient` for the block (credentials default to this process's environment).

    Raises:
        ConfigError: the credentials are missing, or the embedded store file does not exist.
    """
    creds = credentials if credentials is not None else SessionCredentials.from_environ()
    async with open_control_plane(
        creds.control_plane,
        environment_id=creds.environment_id,
        key=creds.token,
        create=False,
        setting=SESSION_CONTROL_PLANE_ENV,
        missing_key="the session credential is empty",
    ) as plane:
        # The embedded plane has no server to check the credential: the client does.
        yield SessionClient(plane, creds, check=isinstance(plane, EmbeddedControlPlane))
