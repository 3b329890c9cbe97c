"""Per-session workspaces: a private directory for each agent run, always removed after.

Two kinds:

``none``
    An empty directory under ``STATE_DIR/workspaces/``.

``git``
    A ``git clone --local`` of a warm base repository kept under
    ``STATE_DIR/git-base/``. The base is a ``--mirror`` clone of ``base_repo``
    made on first use; every workspace clones it locally, so objects are
    hardlinked, not copied, and a clone costs milliseconds whatever the
    history's size. The workspace's ``origin`` is then pointed at
    ``base_repo`` itself, so an agent that fetches or pushes talks to the
    real upstream, not to the cache.

Keeping the base fresh without stalling sessions
------------------------------------------------

The base is fetched at most once per ``fetch_interval`` seconds. The
``trio.Lock`` guards only setup bookkeeping: creating the base on first use
(every session has to wait for that: there is nothing to clone yet) and
deciding whether a fetch is due. The fetch itself (network I/O, possibly
slow) runs outside the lock, in the session that found it due, which waits
for it so that its workspace is fresh. Sessions arriving while that fetch is
in flight wait for it at most ``fetch_wait`` seconds, then clone the base as
it is: git updates refs atomically after writing objects, so a concurrent
clone sees a consistent, merely older, state. A failed fetch is logged and the
sessions go on with the older state; it is retried after the next interval.

Names
-----

Directory names never come from untrusted input as is: the session id is
reduced to ``[A-Za-z0-9._-]``, stripped of leading dots and dashes, capped in
length and given a random suffix, and the directory is created exclusively.

Cleanup
-------

A workspace is removed when the ``open()`` block exits, however it exits
(cancellation included), in a shielded scope bounded by ``cleanup_timeout``,
unless ``keep_workspaces`` is set (then its path is logged). Removal runs in a
worker thread and copes with read-only directories an agent left behind.

A worker that is killed (SIGKILL, a power cut) runs no cleanup at all, so each
manager makes its workspaces in a run directory of its own,
``STATE_DIR/workspaces/run-<random>/``, and holds an exclusive ``flock`` on
``run-<random>.lock`` next to it for as long as it lives. The kernel drops
that lock when the process dies, however it dies. `WorkspaceManager.sweep`,
which a worker calls as it starts, removes the run directories whose lock
nobody holds: what crashed workers left behind, never a live worker's
workspaces, even when several workers share one state directory. A manager
with ``keep_workspaces`` takes no lock, so what it keeps is never swept.

A dead worker's run may still be in use: an agent that outlived its worker
(on a machine without the reaper's protection, DESIGN §3.8), or a process it
started, working in its directory. So the sweep also looks in ``/proc`` for
any process whose working directory, root or open files lie inside the run,
and leaves such a run alone (logged) for a later sweep: removing a live
agent's workspace under it would turn a leftover into corruption.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from .._base._exceptions import ConfigError, SupervisorError
from .._base._lane import Offload

__all__ = [
    "WorkspaceError",
    "WorkspaceKind",
    "WorkspaceManager",
    "WorkspaceStatistics",
    "processes_using",
    "safe_name",
]

logger = logging.getLogger("supervisor.workspace")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
_GIT_ENV_PASSTHROUGH = ("PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "SSH_AUTH_SOCK")
# Housekeeping that git would otherwise run as a detached daemon (it calls
# setsid(), so no process-group sweep could find it) runs in the foreground,
# inside the command's time limit.
_GIT_OPTIONS = ("-c", "gc.autoDetach=false", "-c", "maintenance.autoDetach=false")


class WorkspaceError(SupervisorError):
    """A workspace could not be prepared (for example ``git clone`` failed)."""


class WorkspaceKind(enum.StrEnum):
    """How a session's workspace is made."""

    NONE = "none"
    GIT = "git"


def safe_name(text: str, *, max_length: int = 48) -> str:
    """A file-name-safe form of an untrusted id (without any uniqueness suffix).

    Only ``[A-Za-z0-9._-]`` survive, runs of anything else become one ``_``;
    leading dots and dashes are dropped so the result is never hidden, never
    ``.``/``..`` and never looks like an option. Never empty.
    """
    cleaned = _UNSAFE.sub("_", text).lstrip(".-")[:max_length]
    return cleaned or "session"


def _redact(text: str) -> str:
    """Hide credentials embedded in URLs (``https://user:token@host``)."""
    return _USERINFO.sub("***@", text)


def _looks_remote(location: str) -> bool:
    if "://" in location:
        return True
    # scp-like "host:path" or "user@host:path", where no "/" comes before the ":".
    head = location.split("/", 1)[0]
    return ":" in head and not Path(location).exists()


def _make_accessible(path: str) -> bool:
    """Give the owner full rights on a directory; whether anything changed."""
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISDIR(mode) or stat.S_IMODE(mode) & stat.S_IRWXU == stat.S_IRWXU:
            return False
        os.chmod(path, stat.S_IMODE(mode) | stat.S_IRWXU)
    except OSError:
        return False
    return True


def _remove_if_empty(path: Path) -> bool:
    """``rmdir``; ``False`` when the directory has something in it (or cannot be removed)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _remove_tree(path: Path) -> None:
    """``shutil.rmtree`` that also removes directories an agent made read-only."""

    def retry(function: Callable[..., Any], failed: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return
        if not isinstance(exc, PermissionError):
            raise exc
        fixed = _make_accessible(os.path.dirname(failed))
        if os.path.isdir(failed) and not os.path.islink(failed):
            fixed = _make_accessible(failed) or fixed
            if fixed and function is not os.rmdir:
                # It could not be listed: now it can, start over below it.
                _remove_tree(Path(failed))
                return
        if not fixed:
            raise exc
        function(failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:

        def onerror(function: Callable[..., Any], failed: str, info: Any) -> None:
            retry(function, failed, info[1])

        shutil.rmtree(path, onerror=onerror)


async def _kill_group(process: trio.Process) -> None:
    """``deliver_cancel`` for git: the whole group (remote helpers too), SIGTERM then SIGKILL."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        await trio.sleep(1.0)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@attrs.frozen
class WorkspaceStatistics:
    """Counters for status pages and tests.

    Attributes:
        kind: the workspace kind.
        active: workspaces currently open.
        created: workspaces made so far.
        removed: workspaces removed so far.
        base_clones: times the warm base was cloned from ``base_repo``.
        fetches: fetches of the base that were started.
        fetch_failures: fetches that failed or timed out.
    """

    kind: WorkspaceKind
    active: int
    created: int
    removed: int
    base_clones: int
    fetches: int
    fetch_failures: int


def _to_base_repo(value: str | os.PathLike[str] | None) -> str | None:
    if value is None:
        return None
    text = os.fspath(value)
    if not text:
        return None
    return text if _looks_remote(text) else os.path.abspath(text)


_RUN_PREFIX = "run-"
_LOCK_SUFFIX = ".lock"


def _lock_run(lock_path: Path, *, create: bool) -> int | None:
    """Open and ``flock`` a run's lock file: the descriptor, or ``None`` if someone holds it.

    Raises:
        FileNotFoundError: ``create`` is false and the file is gone.
    """
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(lock_path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _chown_tree(path: Path, owner: tuple[int, int]) -> None:
    """Hand a whole tree to ``owner`` (a git workspace cloned by the worker)."""
    os.lchown(path, *owner)
    for parent, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.lchown(os.path.join(parent, name), *owner)


def processes_using(directory: Path) -> list[int]:
    """Pids of the processes whose cwd, root or an open file is inside ``directory``.

    Read from ``/proc`` (empty where it is not available); processes whose
    links this process may not read are not seen, so run the sweep with the
    rights the agents had or more.
    """
    try:
        target = os.path.realpath(directory)
        names = os.listdir("/proc")
    except OSError:
        return []
    inside = target.rstrip("/") + "/"
    own = os.getpid()
    found = []
    for name in names:
        if not name.isdigit() or int(name) == own:
            continue
        base = f"/proc/{name}"
        links = [f"{base}/cwd", f"{base}/root"]
        try:
            links += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
        except OSError:
            pass
        for link in links:
            try:
                path = os.readlink(link)
            except OSError:
                continue
            if path == target or path.startswith(inside):
                found.append(int(name))
                break
    return found


def _sweep_dead_runs(workspaces: Path, own_run: str) -> int:
    """Remove the run directories under ``workspaces`` whose lock nobody holds.

    Returns how many workspaces they held. Errors are logged, never raised:
    a sweep that fails leaves the leftovers for the next one.
    """
    try:
        names = os.listdir(workspaces)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in sorted(names):
        run = name.removesuffix(_LOCK_SUFFIX)
        if run in (name, own_run) or not run.startswith(_RUN_PREFIX):
            continue
        lock_path = workspaces / name
        try:
            fd = _lock_run(lock_path, create=False)
        except FileNotFoundError:
            continue  # its worker closed it meanwhile
        except OSError as exc:
            logger.warning("cannot check %s for a live worker: %s", lock_path, exc)
            continue
        if fd is None:
            continue  # a live worker's run
        run_dir = workspaces / run
        users = processes_using(run_dir)
        if users:
            logger.warning(
                "not removing %s: still used by live process(es) %s",
                run_dir,
                ", ".join(map(str, users[:10])),
            )
            os.close(fd)
            continue
        try:
            try:
                left = len(os.listdir(run_dir))
            except FileNotFoundError:
                left = 0
            else:
                _remove_tree(run_dir)
            removed += left
            # Last, so that a sweep interrupted above finds the run again.
            _unlink_quietly(lock_path)
        except OSError as exc:
            logger.warning("could not remove the leftovers in %s: %s", run_dir, exc)
        finally:
            os.close(fd)
    return removed


@attrs.define(eq=False)
class WorkspaceManager:
    """Makes and removes per-session workspaces under a state directory.

    One manager is shared by all sessions of a worker (it holds the shared
    git base and its fetch schedule). Call `aclose` when done with it (a
    manager that is never closed leaves an empty run directory, which the next
    `sweep` after its process ended removes).

    Args:
        state_dir: the worker's state directory; workspaces live in this
            manager's run directory ``state_dir/workspaces/run-<random>``
            (`root`), the git base in ``state_dir/git-base``.
        kind: ``none`` or ``git``.
        base_repo: the repository a ``git`` workspace comes from (a path or a URL).
        keep_workspaces: leave workspaces on disk after the session (debugging).
        fetch_interval: at most one fetch of the base per this many seconds.
        fetch_wait: how long a session waits for another session's fetch in
            flight before cloning the base as it is.
        git_timeout: limit for each git command that may touch the network
            (base clone, fetch).
        clone_timeout: limit for the local clone of a workspace.
        cleanup_timeout: limit for removing a workspace.
        git: the git executable.
        owner: ``(uid, gid)`` the workspaces are handed to, when agents run as
            another user (``agent_user``); the run directories are then
            traversable (``0o711``, never listable) so that user can reach its own
            workspace, and nothing else of the state directory.
        offload: runs the short blocking steps (making a directory, removing
            one the agent left empty) away from the event loop; a worker passes
            its `~supervisor._lane.ThreadLane`. Removing a tree with files in
            it, and git, always use ``trio.to_thread`` so that a long removal
            holds up no other session.

    Raises:
        ConfigError: ``git`` without a ``base_repo``.
    """

    state_dir: Path = attrs.field(converter=Path)
    kind: WorkspaceKind = attrs.field(default=WorkspaceKind.NONE, converter=WorkspaceKind)
    base_repo: str | None = attrs.field(default=None, converter=_to_base_repo)
    keep_workspaces: bool = False
    fetch_interval: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))
    fetch_wait: float = attrs.field(default=2.0, validator=attrs.validators.ge(0))
    git_timeout: float = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    clone_timeout: float = attrs.field(default=120.0, validator=attrs.validators.gt(0))
    cleanup_timeout: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    git: str = "git"
    owner: tuple[int, int] | None = None
    offload: Offload = attrs.field(default=trio.to_thread.run_sync, repr=False)

    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False, repr=False)
    _base_ready: bool = attrs.field(default=False, init=False, repr=False)
    _last_fetch: float | None = attrs.field(default=None, init=False, repr=False)
    _fetch_done: trio.Event | None = attrs.field(default=None, init=False, repr=False)
    _active: int = attrs.field(default=0, init=False, repr=False)
    _created: int = attrs.field(default=0, init=False, repr=False)
    _removed: int = attrs.field(default=0, init=False, repr=False)
    _base_clones: int = attrs.field(default=0, init=False, repr=False)
    _fetches: int = attrs.field(default=0, init=False, repr=False)
    _fetch_failures: int = attrs.field(default=0, init=False, repr=False)
    _run: str = attrs.field(
        factory=lambda: _RUN_PREFIX + secrets.token_hex(6), init=False, repr=False
    )
    _run_lock_fd: int | None = attrs.field(default=None, init=False, repr=False)
    _run_ready: bool = attrs.field(default=False, init=False, repr=False)
    # Guards the one-time creation of the run directory: with the default
    # offload two sessions may make their directories in two threads at once.
    _run_mutex: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.kind is WorkspaceKind.GIT and self.base_repo is None:
            raise ConfigError("a git workspace needs a base repository", key="base_repo")

    @property
    def workspaces_dir(self) -> Path:
        """Where the run directories of every manager on this state directory live."""
        return self.state_dir / "workspaces"

    @property
    def root(self) -> Path:
        """Where this manager makes workspaces: its own run directory."""
        return self.workspaces_dir / self._run

    @property
    def _lock_path(self) -> Path:
        return self.workspaces_dir / (self._run + _LOCK_SUFFIX)

    async def sweep(self) -> int:
        """Remove the workspaces that managers which no longer run left behind.

        Those of a worker that was killed before it could clean up, found by
        their run lock that no live process holds (see the module's notes).
        Never raises for what it cannot remove: that is logged, and left for
        the next sweep.

        Returns:
            how many workspaces were removed.
        """
        removed = await trio.to_thread.run_sync(
            _sweep_dead_runs, self.workspaces_dir, self._run, abandon_on_cancel=True
        )
        if removed:
            logger.warning(
                "removed %d workspace(s) left in %s by a worker that did not clean up",
                removed,
                self.workspaces_dir,
            )
        return removed

    async def aclose(self) -> None:
        """Give up the run directory (if empty) and its lock; the manager can then be swept.

        Call it once every workspace is closed; it does not wait for removals
        still running in the background after ``cleanup_timeout``.
        """
        if not self._run_ready:
            return
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._release_run)

    def _release_run(self) -> None:
        with self._run_mutex:
            if not self._run_ready:
                return
            self._run_ready = False
            fd, self._run_lock_fd = self._run_lock_fd, None
            try:
                # While still locked: no sweep takes this run for a dead one meanwhile.
                # A removal still running after its timeout leaves the directory and
                # its lock file behind, so that a later sweep can finish the job.
                if _remove_if_empty(self.root) and fd is not None:
                    _unlink_quietly(self._lock_path)
            finally:
                if fd is not None:
                    os.close(fd)

    def _ensure_run_dir(self) -> None:
        """Create the run directory, and lock it first unless workspaces are kept."""
        with self._run_mutex:
            if self._run_ready:
                return
            mode = 0o700 if self.owner is None else 0o711
            self.workspaces_dir.mkdir(parents=True, exist_ok=True, mode=mode)
            if self.owner is not None:
                os.chmod(self.workspaces_dir, mode)
            if not self.keep_workspaces:
                fd = _lock_run(self._lock_path, create=True)
                assert fd is not None, "a fresh run name is never locked"
                self._run_lock_fd = fd
            try:
                self.root.mkdir(mode=mode)
            except BaseException:
                fd, self._run_lock_fd = self._run_lock_fd, None
                if fd is not None:
                    _unlink_quietly(self._lock_path)
                    os.close(fd)
                raise
            self._run_ready = True

    @property
    def base_path(self) -> Path | None:
        """Where the warm base repository lives (``None`` for ``none`` workspaces)."""
        if self.base_repo is None or self.kind is not WorkspaceKind.GIT:
            return None
        digest = hashlib.sha256(self.base_repo.encode()).hexdigest()[:12]
        name = safe_name(Path(self.base_repo.rstrip("/")).name, max_length=32)
        return self.state_dir / "git-base" / f"{name}-{digest}.git"

    def statistics(self) -> WorkspaceStatistics:
        """A snapshot of the counters."""
        return WorkspaceStatistics(
            kind=self.kind,
            active=self._active,
            created=self._created,
            removed=self._removed,
            base_clones=self._base_clones,
            fetches=self._fetches,
            fetch_failures=self._fetch_failures,
        )

    @asynccontextmanager
    async def open(self, session_id: str) -> AsyncIterator[Path]:
        """A fresh workspace for one session, removed when the block exits.

        Args:
            session_id: any string; only a sanitised form reaches the file system.

        Yields:
            the absolute path of the workspace directory.

        Raises:
            WorkspaceError: the workspace could not be prepared.
            ConfigError: the base repository is a local path that does not exist.
        """
        path = await self._make_dir(session_id)
        self._active += 1
        try:
            if self.kind is WorkspaceKind.GIT:
                await self._clone_into(path)
                if self.owner is not None:
                    await trio.to_thread.run_sync(_chown_tree, path, self.owner)
            yield path
        finally:
            self._active -= 1
            with trio.CancelScope(shield=True):
                await self._remove(path)

    # -- directories ---------------------------------------------------------

    async def _make_dir(self, session_id: str) -> Path:
        base = safe_name(session_id)

        def make() -> Path:
            if not self._run_ready:
                self._ensure_run_dir()
            return self._new_dir(base)

        try:
            path: Path = await self.offload(make)
        except OSError as exc:
            raise WorkspaceError(f"cannot create a workspace under {self.root}: {exc}") from exc
        self._created += 1
        return path

    def _new_dir(self, base: str) -> Path:
        while True:
            path = self.root / f"{base}-{secrets.token_hex(4)}"
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                continue
            if self.owner is not None:
                os.chown(path, *self.owner)
            return path

    async def _remove(self, path: Path) -> None:
        if self.keep_workspaces:
            logger.info("keeping workspace %s", path)
            return
        with trio.move_on_after(self.cleanup_timeout) as scope:
            try:
                # An empty directory (the agent left nothing) goes with one rmdir.
                if await self.offload(_remove_if_empty, path):
                    self._removed += 1
                    return
                await trio.to_thread.run_sync(_remove_tree, path, abandon_on_cancel=True)
            except OSError as exc:
                logger.warning("could not remove workspace %s: %s", path, exc)
                return
        if scope.cancelled_caught:
            logger.warning(
                "removing workspace %s took over %gs; left it to finish in the background",
                path,
                self.cleanup_timeout,
            )
            return
        self._removed += 1

    # -- git -----------------------------------------------------------------

    def _git_env(self) -> dict[str, str]:
        # Nothing of the worker's git context (GIT_DIR, GIT_WORK_TREE, ...) and
        # no prompt that would hang a headless worker forever.
        env = {k: v for k, v in os.environ.items() if k in _GIT_ENV_PASSTHROUGH}
        env.update(
            {
                "GIT_TERMINAL_PROMPT": "0",
                "GCM_INTERACTIVE": "never",
                "GIT_CONFIG_NOSYSTEM": "1",
                "LC_ALL": "C",
            }
        )
        return env

    async def _run_git(self, *args: str, limit: float) -> None:
        what = f"git {args[2] if args[0] == '-C' else args[0]}"
        try:
            with trio.fail_after(limit):
                result = await trio.run_process(
                    [self.git, *_GIT_OPTIONS, *args],
                    stdin=subprocess.DEVNULL,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=self._git_env(),
                    start_new_session=True,
                    deliver_cancel=_kill_group,
                )
        except trio.TooSlowError:
            raise WorkspaceError(f"{what} timed out after {limit:g}s") from None
        except OSError as exc:
            raise WorkspaceError(f"cannot run {self.git!r}: {exc}") from exc
        if result.returncode != 0:
            stderr = result.stderr.decode("utf-8", errors="replace").strip()
            detail = _redact(" / ".join(stderr.splitlines()[-3:])) or "no message"
            raise WorkspaceError(f"{what} failed (exit code {result.returncode}): {detail}")

    async def _clone_into(self, path: Path) -> None:
        base = await self._prepare_base()
        assert self.base_repo is not None
        await self._run_git(
            "clone", "--local", "--quiet", "--", os.fspath(base), os.fspath(path),
            limit=self.clone_timeout,
        )  # fmt: skip
        await self._run_git(
            "-C", os.fspath(path), "remote", "set-url", "origin", self.base_repo,
            limit=self.clone_timeout,
        )  # fmt: skip

    async def _prepare_base(self) -> Path:
        base = self.base_path
        assert base is not None
        async with self._lock:
            if not self._base_ready:
                await self._create_base(base)
                self._base_ready = True
            now = trio.current_time()
            due = self._last_fetch is None or now - self._last_fetch >= self.fetch_interval
            in_flight = self._fetch_done
            if due and in_flight is None:
                self._last_fetch = now
                done = self._fetch_done = trio.Event()
            else:
                done = None
        if done is not None:
            try:
                await self._fetch_base(base)
            finally:
                self._fetch_done = None
                done.set()
        elif in_flight is not None:
            with trio.move_on_after(self.fetch_wait):
                await in_flight.wait()
        return base

    async def _create_base(self, base: Path) -> None:
        assert self.base_repo is not None
        if await trio.to_thread.run_sync((base / "HEAD").exists):
            # Left by an earlier run: usable at once, fetched by this session.
            self._last_fetch = None
            return
        if not _looks_remote(self.base_repo) and not await trio.to_thread.run_sync(
            os.path.isdir, self.base_repo
        ):
            raise ConfigError(f"no such directory: {self.base_repo}", key="base_repo")
        # Clone next to the final place and rename, so a crash halfway never
        # leaves something that looks like a usable base.
        partial = base.with_name(f"{base.name}.partial-{secrets.token_hex(4)}")
        await trio.to_thread.run_sync(lambda: base.parent.mkdir(parents=True, exist_ok=True))
        try:
            await self._run_git(
                "clone", "--mirror", "--quiet", "--", self.base_repo, os.fspath(partial),
                limit=self.git_timeout,
            )  # fmt: skip
            await trio.to_thread.run_sync(os.rename, partial, base)
        except BaseException:
            # Shielded but bounded: a removal still running then finishes in the background.
            with trio.CancelScope(shield=True), trio.move_on_after(self.cleanup_timeout):
                await trio.to_thread.run_sync(shutil.rmtree, partial, True, abandon_on_cancel=True)
            raise
        self._base_clones += 1
        self._last_fetch = trio.current_time()
        logger.info("warm git base for %s ready at %s", _redact(self.base_repo), base)

    async def _fetch_base(self, base: Path) -> None:
        self._fetches += 1
        try:
            await self._run_git(
                "-C", os.fspath(base), "fetch", "--prune", "--quiet", "origin",
                limit=self.git_timeout,
            )  # fmt: skip
        except WorkspaceError as exc:
            self._fetch_failures += 1
            logger.warning("fetching the git base failed; using it as it is: %s", exc)
