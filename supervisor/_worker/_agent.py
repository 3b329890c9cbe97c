"""What an agent is, what it may see, and how one run of it is started.

An agent is either a command (an argv template) or an in-process async
callable. Either way it gets the same inputs (prompt, ids, workspace,
environment) and produces the same :class:`~supervisor._process.AgentResult`,
so the layers above never care which kind they run.

Nothing here knows about leases, pollers or supervision trees.

The environment policy
======================

An agent is untrusted code working on untrusted input, so it inherits nothing
by default. It sees:

1. the variables of the worker's environment named by the allowlist
   (:data:`DEFAULT_ENV_ALLOWLIST`, plus the configured extra names);
2. the per-session variables the caller passes (for example a
   session-scoped credential; they are never logged nor shown in a repr);
3. ``SUPERVISOR_WORK_ID``, ``SUPERVISOR_SESSION_ID`` and
   ``SUPERVISOR_WORKSPACE``, which always win.

Allowlist entries are exact names or ``fnmatch`` patterns (``LC_*``). A name
that only matches a *pattern* is still refused when it looks like a secret
(a ``_``-separated word ending in ``KEY``, ``TOKEN``, ``SECRET``,
``PASSWORD``, ``CREDENTIAL(S)``, or the words ``AUTH``/``PASS``/``PRIVATE``)
or starts with ``SUPERVISOR_``: ``extra=("ANTHROPIC_*",)`` passes
``ANTHROPIC_BASE_URL`` but not ``ANTHROPIC_API_KEY``. Naming a variable
exactly is the explicit opt-in, so ``extra=("ANTHROPIC_API_KEY",)`` does pass
it. The worker's own environment key (``SUPERVISOR_ENVIRONMENT_KEY``) is
therefore never passed on unless it is named exactly.

The default allowlist is what ordinary command-line programs need to find
programs, locale and a home directory, and nothing that configures the
worker's own runtime: ``PYTHONPATH``, ``VIRTUAL_ENV`` and friends describe the
worker's interpreter, and pointing a Python agent living in another
environment at them breaks it in confusing ways. Proxy variables are left out
too, because their URLs often carry credentials. Add any of them with
``extra`` when an agent needs them.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import json
import logging
import os
import re
import shlex
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path

import attrs
import trio

from .._base._exceptions import ConfigError
from .._base._lane import Offload
from ._inbox import Inbox
from ._process import AgentResult, SessionOutput, run_agent_process

__all__ = [
    "DEFAULT_ENV_ALLOWLIST",
    "AgentContext",
    "AgentFunction",
    "AgentRunner",
    "AgentSpec",
    "EnvPolicy",
    "is_async_callable",
    "looks_secret",
    "qualified_name",
]

logger = logging.getLogger("supervisor.agent")

#: Variables (names or ``fnmatch`` patterns) an agent inherits by default.
DEFAULT_ENV_ALLOWLIST: frozenset[str] = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "LC_*",
        "TERM",
        "TMPDIR",
        "TZ",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    }
)

_SECRET_SUFFIXES = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS")
_SECRET_WORDS = frozenset({"AUTH", "PASS", "PRIVATE"})
_ENV_NAME = re.compile(r"^[^=\x00]+$")
_CALLABLE_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_PLACEHOLDER = re.compile(r"\{(prompt|work_id|session_id)\}")


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name suggests it holds a secret.

    Word-based (``_``-separated), so ``GITHUB_TOKEN`` and
    ``AWS_SECRET_ACCESS_KEY`` look secret while ``KEYBOARD_LAYOUT`` does not.
    """
    for word in name.upper().split("_"):
        if word.endswith(_SECRET_SUFFIXES) or word in _SECRET_WORDS:
            return True
    return False


def _check_env_names(names: Iterable[str], key: str) -> frozenset[str]:
    result = frozenset(names)
    for name in result:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ConfigError(f"not an environment variable name: {name!r}", key=key)
    return result


def _to_name_set(value: Iterable[str]) -> frozenset[str]:
    if isinstance(value, str):
        # A bare string would otherwise become a set of its characters.
        return frozenset({value})
    return frozenset(value)


@attrs.frozen
class EnvPolicy:
    """Which variables of the worker's environment an agent inherits.

    See the module docstring for the rules and the reasons behind the default.

    Args:
        allow: the base allowlist (names or ``fnmatch`` patterns).
        extra: configured additions; an exact name here is the explicit
            opt-in for a variable that looks like a secret.
    """

    allow: frozenset[str] = attrs.field(default=DEFAULT_ENV_ALLOWLIST, converter=_to_name_set)
    extra: frozenset[str] = attrs.field(factory=frozenset, converter=_to_name_set)

    _patterns: tuple[str, ...] = attrs.field(init=False, repr=False, eq=False)
    _verdicts: dict[str, bool] = attrs.field(init=False, repr=False, eq=False)
    _last: tuple[object, dict[str, str]] | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        _check_env_names(self.allow, "agent_env_allow")
        _check_env_names(self.extra, "agent_env")
        # computed once: ``admits`` runs for every variable of every session
        patterns = tuple(p for p in (*self.allow, *self.extra) if any(c in p for c in "*?["))
        object.__setattr__(self, "_patterns", patterns)
        object.__setattr__(self, "_verdicts", {})
        object.__setattr__(self, "_last", None)

    def admits(self, name: str) -> bool:
        """Whether the variable ``name`` of the worker's environment is passed on."""
        verdict = self._verdicts.get(name)
        if verdict is None:
            if len(self._verdicts) > 4096:  # names come from the environment: stay bounded
                self._verdicts.clear()
            verdict = self._verdicts[name] = self._decide(name)
        return verdict

    def _decide(self, name: str) -> bool:
        if name in self.allow or name in self.extra:
            return True
        if name.startswith("SUPERVISOR_") or looks_secret(name):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self._patterns)

    def _admitted(self, source: Mapping[str, str]) -> dict[str, str]:
        """The admitted part of ``source``, recomputed only when ``source`` changed.

        Filtering the worker's whole environment for every session costs more
        than the rest of building it; the environment rarely changes. The cache
        key is a copy of ``source`` compared in C: for ``os.environ`` its raw
        ``bytes`` mapping, which skips decoding every variable on each session
        (a dict compared with a dict: no snapshot is built per session).
        """
        raw = getattr(source, "_data", None) if source is os.environ else None
        current = raw if isinstance(raw, dict) else source
        last = self._last
        if last is not None and last[0] == current:
            return last[1]
        admitted = {name: value for name, value in source.items() if self.admits(name)}
        object.__setattr__(self, "_last", (dict(current), admitted))
        return admitted

    def build(
        self,
        source: Mapping[str, str],
        *,
        work_id: str,
        session_id: str,
        workspace: Path,
        session_env: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """The complete environment of one agent run.

        Args:
            source: the worker's environment (usually ``os.environ``).
            work_id: becomes ``SUPERVISOR_WORK_ID``.
            session_id: becomes ``SUPERVISOR_SESSION_ID``.
            workspace: becomes ``SUPERVISOR_WORKSPACE``.
            session_env: per-session variables, added after the allowlist.

        Raises:
            ValueError: a per-session variable has an unusable name or value
                (the message names the variable, never its value).
        """
        env = dict(self._admitted(source))
        for name, value in (session_env or {}).items():
            if not isinstance(name, str) or not _ENV_NAME.match(name):
                raise ValueError(f"invalid environment variable name {name!r}")
            if not isinstance(value, str) or "\x00" in value:
                raise ValueError(f"invalid value for environment variable {name!r}")
            env[name] = value
        env["SUPERVISOR_WORK_ID"] = work_id
        env["SUPERVISOR_SESSION_ID"] = session_id
        env["SUPERVISOR_WORKSPACE"] = os.fspath(workspace)
        return env


@attrs.frozen
class AgentContext:
    """What an in-process agent gets: its inputs, and a way to report output.

    Attributes:
        prompt: the task.
        work_id: the work item's id.
        session_id: the session's id.
        workspace: the session's private directory (the process's cwd is not
            changed for in-process agents: use this path explicitly).
        env: the environment a subprocess agent would have had (allowlist,
            per-session variables, ``SUPERVISOR_*``); read-only, never in repr.
        inbox: where the results of this session's delegations arrive while it
            runs (``await ctx.inbox.receive()``); ``None`` when the runner
            delivers none (see `supervisor._inbox`).
    """

    prompt: str
    work_id: str
    session_id: str
    workspace: Path
    env: Mapping[str, str] = attrs.field(repr=False)
    _output: SessionOutput = attrs.field(repr=False, alias="output")
    inbox: Inbox | None = attrs.field(default=None, repr=False)

    def emit(self, line: str) -> None:
        """Report a line of progress or output.

        It takes the same path as a subprocess's stdout: session log,
        ``on_line`` watchers, tail, and result extraction (a JSON object line
        with a ``result`` field counts, though returning the result is simpler).
        """
        self._output.emit(line)


#: An in-process agent: ``async def agent(ctx: AgentContext) -> object``.
AgentFunction = Callable[[AgentContext], Awaitable[object]]


def is_async_callable(obj: object) -> bool:
    """Whether calling ``obj`` gives a coroutine: an ``async def``, or an object whose
    ``__call__`` is one."""
    if inspect.iscoroutinefunction(obj):
        return True
    call = getattr(obj, "__call__", None)  # noqa: B004 - instances with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def _check_argv(
    instance: object,
    attribute: attrs.Attribute[tuple[str, ...] | None],
    value: tuple[str, ...] | None,
) -> None:
    if value is None:
        return
    if not value:
        raise ConfigError("the agent command is empty", key="agent")
    for arg in value:
        if not isinstance(arg, str):
            raise ConfigError(f"agent arguments must be strings, not {arg!r}", key="agent")


def _to_argv(value: Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ConfigError("give the agent command as a sequence of arguments", key="agent")
    return tuple(value)


@attrs.frozen
class AgentSpec:
    """Which agent to run: an argv template or an in-process async callable.

    Build one with :meth:`parse` (configuration text), :meth:`from_argv` or
    :meth:`from_callable`. Exactly one of ``argv`` and ``function`` is set.

    Attributes:
        argv: the command template. ``{prompt}``, ``{work_id}`` and
            ``{session_id}`` are replaced inside each argument, literally (no
            ``str.format``, so braces in the prompt or elsewhere mean nothing),
            in a single pass (a prompt containing ``{work_id}`` stays as is).
            The result is executed directly, never by a shell.
        function: the in-process agent.
        name: how messages and logs refer to the agent.
    """

    argv: tuple[str, ...] | None = attrs.field(
        default=None, converter=_to_argv, validator=_check_argv
    )
    function: AgentFunction | None = None
    name: str = ""

    def __attrs_post_init__(self) -> None:
        if (self.argv is None) == (self.function is None):
            raise ConfigError("an agent is either a command or a callable", key="agent")
        if self.function is not None and not is_async_callable(self.function):
            raise ConfigError(f"agent {self.name!r} is not an async callable", key="agent")
        if not self.name:
            label = self.argv[0] if self.argv is not None else qualified_name(self.function)
            object.__setattr__(self, "name", label)

    @property
    def is_process(self) -> bool:
        """Whether the agent runs as a subprocess."""
        return self.argv is not None

    @classmethod
    def parse(cls, text: str) -> AgentSpec:
        """Read an agent from configuration text.

        ``package.module:function`` names an in-process agent, imported now so
        that a typo fails at start-up. Anything else is a command line, split
        like a POSIX shell would split it (quotes, backslashes) but never run
        by one. To run a program whose name itself looks like ``a:b``, write
        ``./a:b`` or use :meth:`from_argv`.

        Raises:
            ConfigError: the command is empty or its quotes are unbalanced; or
                the module cannot be imported, has no such attribute, or the
                attribute is not an async callable.
        """
        text = text.strip()
        if _CALLABLE_REF.match(text):
            return cls.from_callable(_import_callable(text), name=text)
        try:
            argv = shlex.split(text)
        except ValueError as exc:
            raise ConfigError(f"cannot split the agent command: {exc}", key="agent") from None
        if not argv:
            raise ConfigError("the agent command is empty", key="agent")
        return cls(argv=tuple(argv))

    @classmethod
    def from_setting(cls, value: str | Sequence[str] | AgentFunction) -> AgentSpec:
        """The agent ``WorkerConfig.agent`` names: text is parsed (see :meth:`parse`), a
        sequence is the command's arguments as they are, and a callable runs in-process."""
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, Sequence):
            return cls.from_argv(value)
        return cls.from_callable(value)

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> AgentSpec:
        """An agent command given as its arguments (no splitting at all)."""
        return cls(argv=tuple(argv))

    @classmethod
    def from_callable(cls, function: AgentFunction, *, name: str | None = None) -> AgentSpec:
        """An in-process agent: ``async def agent(ctx: AgentContext) -> object``."""
        return cls(function=function, name=name or "")

    def render_argv(self, *, prompt: str, work_id: str, session_id: str) -> list[str]:
        """The command for one session, placeholders replaced.

        Raises:
            TypeError: this agent is not a command.
        """
        if self.argv is None:
            raise TypeError(f"agent {self.name!r} is in-process; it has no command")
        values = {"prompt": prompt, "work_id": work_id, "session_id": session_id}

        def substitute(match: re.Match[str]) -> str:
            return values[match.group(1)]

        return [_PLACEHOLDER.sub(substitute, arg) for arg in self.argv]


def qualified_name(obj: object) -> str:
    """``module:qualname`` of a function or object, for messages and status pages."""
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}:{name}" if module else str(name)


def _import_callable(ref: str) -> AgentFunction:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"agent {ref!r}: no module named {exc.name!r}", key="agent") from exc
    except Exception as exc:
        # Importing runs the module's code: any failure there is a configuration problem.
        raise ConfigError(
            f"agent {ref!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}",
            key="agent",
        ) from exc
    try:
        function = getattr(module, attr)
    except AttributeError:
        raise ConfigError(
            f"agent {ref!r}: module {module_name!r} has no attribute {attr!r}", key="agent"
        ) from None
    if not is_async_callable(function):
        raise ConfigError(f"agent {ref!r} is not an async callable (async def)", key="agent")
    result: AgentFunction = function
    return result


def _positive_or_none(
    instance: object, attribute: attrs.Attribute[float | None], value: float | None
) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"must be positive, not {value!r}", key=attribute.name)


@attrs.frozen
class AgentRunner:
    """Runs one agent for one session, in a workspace the caller prepared.

    Frozen configuration; one instance serves every session of a worker.

    Attributes:
        spec: the agent.
        env_policy: what the agent inherits from ``base_env``.
        session_timeout: seconds of execution before the agent is stopped
            (``None``: no limit). Counted from the start of the agent, never
            including the wait for a slot or the workspace setup.
        grace: seconds between SIGTERM and SIGKILL when stopping an agent process.
        kill_timeout: how long to wait for a process to die after SIGKILL.
        reap_orphans: reap killed descendants this process inherits; see
            :func:`supervisor._process.enable_orphan_reaping` (process-wide).
        base_env: the environment the allowlist reads from; ``None`` means
            ``os.environ`` at the time of each run.
        user: run subprocess agents as this user (name or uid), so that they
            cannot read the worker's memory, environment or key file; the
            worker needs the privilege to switch users (it runs as root).
        group: their group (default: the user's primary group).
        spawner: starts agent processes away from the event loop (the worker's
            lane); ``trio.to_thread.run_sync`` when ``None``.
    """

    spec: AgentSpec
    env_policy: EnvPolicy = attrs.field(factory=EnvPolicy)
    session_timeout: float | None = attrs.field(default=None, validator=_positive_or_none)
    grace: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    kill_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    reap_orphans: bool = False
    base_env: Mapping[str, str] | None = attrs.field(default=None, repr=False)
    user: str | int | None = None
    group: str | int | None = None
    spawner: Offload | None = attrs.field(default=None, repr=False)

    async def run(
        self,
        *,
        prompt: str,
        work_id: str,
        session_id: str,
        workspace: Path,
        output: SessionOutput | None = None,
        session_env: Mapping[str, str] | None = None,
        inbox: Inbox | None = None,
        on_spawn: Callable[[int], object] | None = None,
        session_timeout: float | None = None,
    ) -> AgentResult:
        """Run the agent to its end.

        Args:
            prompt: the task, substituted into the command or given to the callable.
            work_id: the work item's id.
            session_id: the session's id.
            workspace: the session's directory (a subprocess's cwd).
            output: log file, ``on_line`` watcher and tail; keep the handle to
                read the tail when the run is cancelled.
            session_env: per-session variables for the agent (never logged).
            inbox: the session's inbox, handed to an in-process agent as
                ``ctx.inbox`` (a subprocess agent reads its file in the workspace).
            on_spawn: called with a subprocess agent's pid once it exists.
            session_timeout: this session's own execution limit (the work item's
                ``timeout``), in place of the runner's; ``None`` keeps the runner's.

        Returns:
            the result; ``result.to_outcome()`` is what ``stop`` reports. A
            failure of the agent (non-zero exit, an exception in an in-process
            agent, a command that cannot be started) is a result, not an error.

        Raises:
            trio.Cancelled: after the agent is stopped (a process group is gone
                entirely before this propagates).
        """
        if output is None:
            output = SessionOutput()
        if session_timeout is not None and not session_timeout > 0:
            raise ValueError(f"session_timeout must be positive, not {session_timeout!r}")
        limit = self.session_timeout if session_timeout is None else session_timeout
        env = self.env_policy.build(
            os.environ if self.base_env is None else self.base_env,
            work_id=work_id,
            session_id=session_id,
            workspace=workspace,
            session_env=session_env,
        )
        if self.spec.argv is not None:
            argv = self.spec.render_argv(prompt=prompt, work_id=work_id, session_id=session_id)
            return await run_agent_process(
                argv,
                cwd=workspace,
                env=env,
                output=output,
                session_timeout=limit,
                grace=self.grace,
                kill_timeout=self.kill_timeout,
                reap_orphans=self.reap_orphans,
                on_spawn=on_spawn,
                user=self.user,
                group=self.group,
                spawner=self.spawner,
            )
        assert self.spec.function is not None
        ctx = AgentContext(
            prompt=prompt,
            work_id=work_id,
            session_id=session_id,
            workspace=workspace,
            env=types.MappingProxyType(env),
            output=output,
            inbox=inbox,
        )
        return await _run_in_process(
            self.spec.function,
            ctx,
            output,
            name=self.spec.name,
            session_timeout=limit,
        )


def _result_text(value: object, output: SessionOutput) -> str:
    if value is None:
        return output.result_text()
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


async def _run_in_process(
    function: AgentFunction,
    ctx: AgentContext,
    output: SessionOutput,
    *,
    name: str,
    session_timeout: float | None,
) -> AgentResult:
    started = trio.current_time()
    error: str | None = None
    value: object = None
    try:
        limit = session_timeout if session_timeout is not None else float("inf")
        with trio.move_on_after(limit) as scope:
            value = await function(ctx)
    except Exception as exc:
        # The agent's failure is the session's result, not the runner's crash.
        # Only the message goes to the result; the traceback is for operators.
        message = str(exc) or type(exc).__name__
        error = f"agent raised {type(exc).__name__}: {message}"
        value = message
        logger.debug("in-process agent %s failed", name, exc_info=True)
        output.note(error)
    else:
        if scope.cancelled_caught:
            output.note(f"session timeout after {limit:g}s: the agent was cancelled")
    finally:
        duration = trio.current_time() - started
        output.note(f"in-process agent ended after {duration:.3f}s")
        output.close()
    if output.callback_error is not None:
        raise output.callback_error
    timed_out = error is None and scope.cancelled_caught
    return AgentResult(
        exit_code=None,
        result=_result_text(value, output),
        tail=output.tail(),
        duration=duration,
        timed_out=timed_out,
        log_path=output.log_path,
        error=error,
    )
