"""Run one agent subprocess in its own process group, and leave nothing of it behind.

This module knows nothing of leases, pollers or supervision trees: it runs one
command in one directory and reports what happened. Three concerns live here:

**Output.** An agent may print anything: a progress line a second, 200 MB in a
burst, one 100 MB line without a newline, bytes that are not UTF-8. stdout and
stderr are read from two separate pipes (so that only stdout is searched for
the result line) and split into lines. Every byte goes to the per-session log
file; each line (capped at ``max_line_chars``, the rest of an overlong line
still goes to the log) goes to the ``on_line`` callback and to a bounded tail.
Memory therefore stays bounded by one line buffer per stream plus the tail,
whatever the agent prints. Bytes are decoded with ``errors="replace"``.

The log file keeps stdout lines verbatim and prefixes stderr lines with
``[stderr] `` and the runner's own notes with ``[supervisor] ``, so one file
tells the whole story in order. It is written through a buffer on the event
loop: a local page-cache write costs microseconds, less than a thread hop
would.

**Termination.** On cancellation, on ``timeout``, and after a normal exit
alike, the process group is stopped in a shielded, bounded scope: SIGTERM to
the whole group, up to ``grace`` seconds for every member to leave, SIGKILL to
the group, always a wait for (and reaping of) the child, then a sweep that
re-sends SIGKILL until ``/proc`` shows no live member of the group. A
grandchild that outlived its parent is still in the group, so it dies too. A
descendant that called ``setsid()`` itself has left the group and is out of
reach of any group-based sweep (only a cgroup could hold it).

**Zombies.** A killed grandchild is reparented to the nearest *subreaper*,
normally PID 1. Not every PID 1 reaps (a bare container entry point often does
not), so with ``reap_orphans=True`` this process makes itself a child
subreaper (Linux ``prctl(PR_SET_CHILD_SUBREAPER)``, process-wide) and reaps
exited members of the agent's group itself, with ``waitid(P_PGID, ...)`` so
that no other child of the host is ever touched.

Cancellation is never swallowed: the cleanup runs, then ``trio.Cancelled``
propagates as it came, unwrapped from the internal nursery's exception group.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

import attrs
import trio

from .._base._groups import collapse_group
from .._base._lane import Offload
from ..controlplane._models import Outcome, OutcomeStatus
from ..controlplane._text import scrub_text

__all__ = [
    "AgentResult",
    "SessionOutput",
    "enable_orphan_reaping",
    "process_group_members",
    "run_agent_process",
]

logger = logging.getLogger("supervisor.agent")

_READ_SIZE = 65536
_TRUNCATED_MARK = " [line truncated]"
_PR_SET_CHILD_SUBREAPER = 36


# --------------------------------------------------------------------------- output


@attrs.define(eq=False)
class SessionOutput:
    """Where one session's output goes: a log file, a callback and a bounded tail.

    The caller creates it and passes it to the runner, and keeps the handle, so
    that the tail is still readable when the run was cancelled (the runner then
    raises instead of returning a result).

    Args:
        log_path: the per-session log file (appended to; parent directories are
            created). ``None`` keeps no log.
        on_line: called synchronously on the event loop with every line (without
            its newline, at most ``max_line_chars`` characters plus a truncation
            mark). It must be quick. If it raises, the session is stopped and the
            exception propagates from the runner.
        tail_lines: how many of the last lines the tail keeps.
        tail_chars: how many characters the tail keeps in total.
        max_line_chars: longest line delivered to ``on_line`` and searched for
            a result. The rest of a longer line only goes to the log file.
        writer: runs a log write later, in order, away from the event loop
            (`ThreadLane.submit`); ``None`` writes at once, on the caller's
            thread. With a writer, `close` is queued behind the writes: a later
            call on the same lane returns once the file is complete. Writes
            (and the open and the close) made while one handed-over call has
            not started yet go with that call: a session that prints little
            costs the writer's thread one or two wake-ups, not one per line.
        log_max_bytes: the most the log may take on disk (``None``: no cap).
            Once the file holds half of it, it is renamed to ``<log>.1``
            (replacing an older one) and a fresh file is started: the two
            files together keep the last ``log_max_bytes / 2`` to
            ``log_max_bytes`` bytes, so an agent printing without end fills
            no disk. The tail, the result and ``on_line`` are not affected.
    """

    log_path: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    on_line: Callable[[str], object] | None = None
    tail_lines: int = attrs.field(default=200, validator=attrs.validators.ge(1))
    tail_chars: int = attrs.field(default=64 * 1024, validator=attrs.validators.ge(1))
    max_line_chars: int = attrs.field(default=1024 * 1024, validator=attrs.validators.ge(1))
    log_max_bytes: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(2))
    )
    writer: Callable[[Callable[[], object]], None] | None = attrs.field(default=None, repr=False)

    #: Lines delivered so far (both streams and ``emit``).
    lines: int = attrs.field(default=0, init=False)
    #: Bytes received from the agent so far (what went to the log, before prefixes).
    bytes_received: int = attrs.field(default=0, init=False)
    #: Lines longer than ``max_line_chars`` (delivered truncated).
    truncated_lines: int = attrs.field(default=0, init=False)
    #: The first exception raised by ``on_line``, if any.
    callback_error: Exception | None = attrs.field(default=None, init=False, repr=False)

    _tail: collections.deque[str] = attrs.field(init=False, repr=False)
    _tail_size: int = attrs.field(default=0, init=False, repr=False)
    _result: str | None = attrs.field(default=None, init=False, repr=False)
    _log: BinaryIO | None = attrs.field(default=None, init=False, repr=False)
    _log_failed: bool = attrs.field(default=False, init=False, repr=False)
    _log_size: int = attrs.field(default=0, init=False, repr=False)
    # With a writer: what the next handed-over flush does, and whether one is
    # queued and not started yet. Shared with the writer's thread; each is one
    # attribute read or swap, atomic under the GIL, and ordered as described
    # in `_flush`.
    _pending: list[bytes] = attrs.field(factory=list, init=False, repr=False)
    _open_pending: bool = attrs.field(default=False, init=False, repr=False)
    _close_pending: bool = attrs.field(default=False, init=False, repr=False)
    _flush_queued: bool = attrs.field(default=False, init=False, repr=False)
    #: A close was asked for and nothing was written since: another close is a no-op.
    _close_asked: bool = attrs.field(default=False, init=False, repr=False)
    #: Flushes handed to the writer, and the number of the last one that ran.
    _handed: int = attrs.field(default=0, init=False, repr=False)
    _flushed: int = attrs.field(default=0, init=False, repr=False)
    #: Times the log was rotated to ``<log>.1`` because of ``log_max_bytes``.
    rotations: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._tail = collections.deque()

    # -- reading -------------------------------------------------------------

    def tail(self) -> tuple[str, ...]:
        """The last lines, oldest first."""
        return tuple(self._tail)

    def tail_text(self) -> str:
        """The tail as one string, lines joined with newlines."""
        return "\n".join(self._tail)

    @property
    def json_result(self) -> str | None:
        """The ``result`` of the last JSON object line on stdout that had one."""
        return self._result

    def result_text(self) -> str:
        """The session's result: the last JSON ``result`` on stdout, else the tail."""
        return self._result if self._result is not None else self.tail_text()

    # -- writing -------------------------------------------------------------

    def emit(self, text: str) -> None:
        """Deliver text from an in-process agent as stdout lines.

        Text with embedded newlines becomes several lines. It is searched for a
        JSON ``result`` line exactly like a subprocess's stdout.
        """
        for line in text.split("\n"):
            data = line.encode("utf-8", errors="replace")
            self.bytes_received += len(data) + 1
            self._write_log(data + b"\n")
            truncated = len(line) > self.max_line_chars
            self._deliver(line[: self.max_line_chars], stream="stdout", truncated=truncated)

    def note(self, text: str) -> None:
        """Write one of the runner's own remarks to the log file only."""
        self._write_log(b"[supervisor] " + text.encode("utf-8", errors="replace") + b"\n")

    def open_log(self) -> None:
        """Create or open the log file now rather than at the first write.

        Blocking (a new file on a busy disk can take milliseconds): a session
        runner calls it off the event loop before its agent starts. A failure
        disables the log, as a failed write does.
        """
        if self.log_path is None or self._log is not None or self._log_failed:
            return
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("ab", buffering=64 * 1024)
            self._log_size = self._log.tell()
        except OSError as exc:
            self._log_error(exc)
        else:
            self._close_asked = False  # open again: the next close has work to do

    def start_log(self) -> None:
        """`open_log` through the ``writer``, queued ahead of every write; at once without one.

        The file then exists before the agent's first output is written, without
        the caller waiting for it.
        """
        if self.log_path is None or self._log_failed:
            return
        self._close_asked = False
        if self.writer is not None:
            self._open_pending = True
            if self._schedule_flush():
                return
            self._open_pending = False
        self.open_log()

    @property
    def queued(self) -> bool:
        """Whether log writes went to the ``writer`` (so the file may still be catching up)."""
        return self._handed > 0

    @property
    def caught_up(self) -> bool:
        """Whether everything handed to the ``writer`` has run (read on the caller's thread
        after a later call on the same lane returned, it is ``True``)."""
        return self._flushed == self._handed

    def close(self) -> None:
        """Flush and close the log file; a later write opens it again for appending.

        With a ``writer`` that got writes, the close is queued behind them.
        """
        if self._close_asked:
            return
        self._close_asked = True
        if self._handed and self.writer is not None:
            self._close_pending = True
            if self._schedule_flush():
                return
            self._close_pending = False
        self._close_now()

    def _close_now(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            try:
                log.close()
            except OSError as exc:
                self._log_error(exc)

    # -- internals -----------------------------------------------------------

    def _write_log(self, data: bytes) -> None:
        if self.log_path is None or self._log_failed:
            return
        self._close_asked = False
        if self.writer is not None:
            self._pending.append(data)
            if self._schedule_flush():
                return
            # The writer takes no more: what it has not taken is written here.
            data_left, self._pending = self._pending, []
            for chunk in data_left:
                self._write_now(chunk)
            return
        self._write_now(data)

    def _schedule_flush(self) -> bool:
        """Make sure a flush is queued on the writer; ``False`` when it takes no more."""
        if self._flush_queued:
            return True  # the queued flush has not started: it takes this along
        assert self.writer is not None
        # Marked before the hand-over: the writer's thread may run the flush at once.
        self._flush_queued = True
        self._handed += 1
        try:
            self.writer(functools.partial(self._flush, self._handed))
        except RuntimeError:
            self._flush_queued = False
            self._handed -= 1
            return False
        return True

    def _flush(self, number: int) -> None:
        """On the writer's thread: the open, the writes and the close asked for so far.

        The queued mark is cleared before anything is taken, so that whatever
        the caller adds from now on gets a flush of its own (or is taken here).
        """
        self._flush_queued = False
        try:
            if self._open_pending:
                self._open_pending = False
                self.open_log()
            data, self._pending = self._pending, []
            for chunk in data:
                self._write_now(chunk)
            if self._close_pending:
                self._close_pending = False
                self._close_now()
        finally:
            self._flushed = number

    def _write_now(self, data: bytes) -> None:
        if self._log_failed:
            return
        if self._log is None:
            self.open_log()
            if self._log is None:
                return
        limit = self.log_max_bytes
        if limit is not None:
            half = limit // 2
            if len(data) > half:
                data = data[-half:]  # one huge chunk: only its end can be kept
            if self._log_size + len(data) > half and not self._rotate():
                return
        try:
            self._log.write(data)
            self._log_size += len(data)
            # Flushed per chunk read (not per line): `tail -f` shows a running session, and a
            # worker killed with SIGKILL leaves a log that says what its agents were.
            self._log.flush()
        except OSError as exc:
            # A full disk must not kill the agent's session: the outcome matters
            # more than its log. Say so once and stop writing.
            self._log_error(exc)

    def _rotate(self) -> bool:
        """Move the full log to ``<log>.1`` and start a fresh one (see ``log_max_bytes``).

        Returns:
            whether a log is open to write to afterwards.
        """
        assert self.log_path is not None
        self._close_now()
        try:
            os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
        except OSError as exc:
            self._log_error(exc)
            return False
        self.rotations += 1
        self.open_log()
        if self._log is not None:
            note = (
                f"[supervisor] log rotated (cap {self.log_max_bytes} bytes); "
                f"the output before this line is in {self.log_path.name}.1\n"
            ).encode()
            self._log.write(note)
            self._log_size += len(note)
        return self._log is not None

    def _log_error(self, exc: OSError) -> None:
        if not self._log_failed:
            self._log_failed = True
            logger.warning("session log %s disabled: %s", self.log_path, exc)

    def _deliver(self, text: str, *, stream: str, truncated: bool) -> None:
        if text.endswith("\r"):
            text = text[:-1]
        # Bytes were decoded with replacement, but an in-process agent's text
        # may hold lone surrogates: repaired here, before any watcher, the tail
        # or a result sees them (nothing downstream could encode them).
        text = scrub_text(text)
        self.lines += 1
        if truncated:
            self.truncated_lines += 1
            text += _TRUNCATED_MARK
        elif stream == "stdout" and '"result"' in text and text.lstrip().startswith("{"):
            self._take_result(text)
        kept = text if len(text) <= self.tail_chars else text[: self.tail_chars]
        self._tail.append(kept)
        self._tail_size += len(kept)
        while len(self._tail) > self.tail_lines or self._tail_size > self.tail_chars:
            self._tail_size -= len(self._tail.popleft())
        if self.on_line is not None:
            try:
                self.on_line(text)
            except Exception as exc:
                if self.callback_error is None:
                    self.callback_error = exc
                raise

    def _take_result(self, text: str) -> None:
        try:
            obj = json.loads(text)
        except ValueError:
            return
        if isinstance(obj, dict) and "result" in obj:
            value = obj["result"]
            # ``{"result": "\ud800"}`` is valid JSON whose string is not valid
            # Unicode: the finished session's result is kept, repaired.
            self._result = scrub_text(value if isinstance(value, str) else json.dumps(value))


class _LineSplitter:
    """Turns one stream's chunks into lines for a :class:`SessionOutput`.

    Holds at most ``max_line_chars`` bytes of the current line. Once a line
    grows past that, its first part is delivered at once (so a watcher sees
    output is flowing) and the rest of it only goes to the log.
    """

    def __init__(self, output: SessionOutput, stream: str) -> None:
        self._output = output
        self._stream = stream
        self._prefix = b"[stderr] " if stream == "stderr" else b""
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, chunk: bytes | bytearray) -> None:
        self._output.bytes_received += len(chunk)
        view = memoryview(chunk)
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                if start < len(chunk):
                    self._extend(view[start:])
                return
            self._extend(view[start:newline])
            self._end_line()
            start = newline + 1

    def finish(self) -> None:
        """Deliver a last line that had no newline."""
        if self._buffer or self._skipping:
            self._end_line()

    def _extend(self, data: memoryview) -> None:
        out = self._output
        if self._skipping:
            out._write_log(bytes(data))
            return
        room = out.max_line_chars - len(self._buffer)
        if len(data) <= room:
            self._buffer += data
            return
        self._buffer += data[:room]
        out._write_log(self._prefix + bytes(self._buffer) + bytes(data[room:]))
        line = self._buffer.decode("utf-8", errors="replace")
        self._buffer.clear()
        self._skipping = True
        out._deliver(line, stream=self._stream, truncated=True)

    def _end_line(self) -> None:
        out = self._output
        if self._skipping:
            self._skipping = False
            out._write_log(b"\n")
            return
        out._write_log(self._prefix + bytes(self._buffer) + b"\n")
        line = self._buffer.decode("utf-8", errors="replace")
        self._buffer.clear()
        out._deliver(line, stream=self._stream, truncated=False)


# --------------------------------------------------------------------------- result


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


@attrs.frozen
class AgentResult:
    """What one agent run produced.

    Attributes:
        exit_code: the process's exit code (negative: killed by that signal);
            ``None`` for an in-process agent or a process that never started.
        result: the last JSON ``result`` on stdout, else the tail text; for a
            failed in-process agent, the exception's message.
        tail: the last lines of output, oldest first.
        duration: seconds from the start of execution to its end (trio clock).
        timed_out: the session timeout stopped the agent.
        log_path: the session log file, if one was kept.
        error: why the agent failed without an exit code (it could not be
            started, or the in-process agent raised).
        pid: the process id, which is also its process group id.
    """

    exit_code: int | None
    result: str
    tail: tuple[str, ...]
    duration: float
    timed_out: bool = False
    log_path: Path | None = None
    error: str | None = None
    pid: int | None = None

    @property
    def status(self) -> OutcomeStatus:
        """``completed``, ``failed`` or ``timeout``.

        The other outcomes (``cancelled``, ``wedged``, ``lease_lost``) are
        decided by whoever cancelled the run, which then gets no result.
        """
        if self.timed_out:
            return OutcomeStatus.TIMEOUT
        if self.error is not None or (self.exit_code is not None and self.exit_code != 0):
            return OutcomeStatus.FAILED
        return OutcomeStatus.COMPLETED

    @property
    def reason(self) -> str | None:
        """A short explanation for anything but ``completed``."""
        if self.timed_out:
            return f"session timeout after {self.duration:.3g}s"
        if self.error is not None:
            return self.error
        if self.exit_code is not None and self.exit_code < 0:
            return f"killed by {_signal_name(-self.exit_code)}"
        if self.exit_code:
            return f"exit code {self.exit_code}"
        return None

    def to_outcome(self) -> Outcome:
        """The record ``stop`` reports for this run."""
        reason = self.reason
        return Outcome(
            status=self.status,
            exit_code=self.exit_code,
            # an in-process agent's return value never passed through the output
            result=scrub_text(self.result) if self.result is not None else None,
            duration=self.duration,
            reason=scrub_text(reason) if reason is not None else None,
        )


# --------------------------------------------------------------------------- process groups


_reaping_enabled: bool | None = None


def enable_orphan_reaping() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux only).

    Process-wide and irreversible, which is why it is opt-in: afterwards every
    orphaned descendant of this process (not only agents) is reparented here
    instead of to PID 1, and only the agents' process groups are reaped by
    this module. Meant for the worker process, which often *is* a container's
    entry point.

    Returns:
        whether orphan reaping is active.
    """
    global _reaping_enabled
    if _reaping_enabled is None:
        _reaping_enabled = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                _reaping_enabled = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
            except (OSError, AttributeError):
                pass
        if not _reaping_enabled:
            logger.warning("cannot become a child subreaper; orphaned agent processes go to PID 1")
    return _reaping_enabled


def process_group_members(pgid: int) -> list[tuple[int, str]] | None:
    """Every process in group ``pgid`` as ``(pid, state)``, from ``/proc``.

    The state is the one-letter code of ``/proc/PID/stat`` (``Z`` for a zombie
    that nobody reaped yet). ``None`` when ``/proc`` is not available.
    """
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    members = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # it exited while we looked
        # The command name may contain spaces and parentheses: split after the last ")".
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append((int(name), fields[0].decode("ascii", "replace")))
    return members


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal the group; ``False`` when it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The id now names someone else's group: ours is gone.
        return False
    return True


def _reap_group(pgid: int) -> None:
    """Reap exited members of group ``pgid`` that are children of this process."""
    while True:
        try:
            info = os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return
        if info is None:
            return


def _group_state(pgid: int, *, reap: bool) -> tuple[bool, list[int]]:
    """Whether the group still has members that matter, and the live ones.

    Without reaping, a zombie is dead for our purposes: whoever its parent is
    will reap it. With reaping, zombies are our own to collect, so the group
    only counts as gone once the kernel has none of it left.
    """
    if reap:
        _reap_group(pgid)
    if not _signal_group(pgid, 0):
        return False, []
    members = process_group_members(pgid)
    if members is None:
        return True, []
    live = [pid for pid, state in members if state not in ("Z", "X")]
    return bool(live) or (reap and bool(members)), live


async def _wait_group_gone(
    pgid: int, deadline: float, *, reap: bool, resend: signal.Signals | None
) -> list[int] | None:
    """Poll until the group is gone or ``deadline`` passes.

    Returns:
        ``None`` when the group is gone, else the pids still alive.
    """
    delay = 0.001
    while True:
        present, live = _group_state(pgid, reap=reap)
        if not present:
            return None
        if resend is not None and live:
            # Again and again: a member may have forked after the last signal.
            _signal_group(pgid, resend)
        now = trio.current_time()
        if now >= deadline:
            return live
        await trio.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.05)


async def _stop_group(
    proc: _AgentProcess,
    output: SessionOutput,
    *,
    grace: float,
    kill_timeout: float,
    reap: bool,
) -> None:
    """SIGTERM, grace, SIGKILL, reap, sweep. Call it shielded; it bounds itself."""
    pgid = proc.pid
    deadline = trio.current_time() + grace
    if proc.returncode is None:
        _signal_group(pgid, signal.SIGTERM)
        with trio.move_on_at(deadline):
            await proc.wait()
    else:
        present, _ = _group_state(pgid, reap=reap)
        if not present:
            return  # the common case: the agent exited and took its children along
        # The agent exited but left processes behind: they get the same
        # polite request and the same grace before SIGKILL.
        output.note("agent exited; stopping the processes it left behind")
        _signal_group(pgid, signal.SIGTERM)
    # Once the leader is reaped, the rest of the group may use the rest of the grace.
    if (
        proc.returncode is not None
        and await _wait_group_gone(pgid, deadline, reap=reap, resend=None) is None
    ):
        return
    leader_alive = proc.returncode is None
    if _signal_group(pgid, signal.SIGKILL):
        if leader_alive:
            output.note(f"agent ignored SIGTERM for {grace:g}s: sent SIGKILL to its group")
        else:
            output.note(f"processes still in the group after {grace:g}s: sent SIGKILL")
    kill_deadline = trio.current_time() + kill_timeout
    with trio.move_on_at(kill_deadline):
        await proc.wait()
    if proc.returncode is None:
        logger.error("agent %d survived SIGKILL for %gs; giving up on it", pgid, kill_timeout)
        return
    left = await _wait_group_gone(pgid, kill_deadline, reap=reap, resend=signal.SIGKILL)
    if left:
        logger.error("processes of agent group %d still alive after SIGKILL: %s", pgid, left)


class _AgentProcess:
    """A started agent: its pid, its two output pipes and its exit, for one caller.

    The part of ``trio.Process`` the runner needs, started by `_spawn`. On
    Linux the exit is awaited on a pidfd, as Trio does; without one a thread
    waits with ``waitid(WNOWAIT)``, leaving the reaping to ``Popen``.

    Not for concurrent use: one task waits at a time (the runner waits in turn).
    """

    __slots__ = ("_pidfd", "_popen", "pid", "stderr", "stdout")

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdout: trio.lowlevel.FdStream,
        stderr: trio.lowlevel.FdStream,
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdout = stdout
        self.stderr = stderr
        self._pidfd: int | None = None
        if _HAS_PIDFD:
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except OSError:  # a kernel before 5.3: the thread fallback below
                pass

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited (and is reaped), else ``None``."""
        code = self._popen.poll()
        if code is not None:
            self._close_pidfd()
        return code

    async def wait(self) -> int:
        """Wait until the process exits, reap it and return its status."""
        if self.returncode is None:
            if self._pidfd is not None:
                try:
                    await trio.lowlevel.wait_readable(self._pidfd)
                except trio.ClosedResourceError:
                    pass  # reaped meanwhile (``returncode`` closes the pidfd)
            else:
                await trio.to_thread.run_sync(_wait_exiting, self.pid, abandon_on_cancel=True)
            self._popen.wait()
            self._close_pidfd()
        else:
            await trio.lowlevel.checkpoint()
        code = self._popen.returncode
        assert code is not None
        return code

    def close(self) -> None:
        """Give up the pidfd (the pipes belong to their readers)."""
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


_HAS_PIDFD = hasattr(os, "pidfd_open")


def _wait_exiting(pid: int) -> None:
    """Block until ``pid`` has exited, without reaping it."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass  # already reaped


async def _spawn(argv: list[str], spawner: Offload | None, **options: Any) -> _AgentProcess:
    """Start ``argv`` with stdin on ``/dev/null`` and stdout/stderr on fresh pipes.

    ``spawner`` runs the blocking ``Popen`` away from the event loop
    (``trio.to_thread.run_sync`` when ``None``). `trio.lowlevel.open_process`
    always takes ``to_thread``; at hundreds of sessions a second that hand-over
    (a thread woken, a context copied, a limiter taken, a wake-up of the event
    loop per start) cost a worker more of its event loop than anything else a
    session did, so the worker passes its own lane (`ThreadLane`). Not
    the event loop itself: ``Popen`` returns only once the child has called
    ``exec``, and on a busy machine the child waits for a CPU first (a median
    of 0.3 ms, 1 ms at the 90th percentile, measured at 400 sessions/s), time
    in which the loop would serve nobody.

    Raises what ``Popen`` raises, with no descriptor left open.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = cast(
        "Callable[[], subprocess.Popen[bytes]]",
        functools.partial(
            subprocess.Popen,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            **options,
        ),
    )
    try:
        popen = await (spawner or trio.to_thread.run_sync)(start)
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        # The child has its own copies: EOF on our ends once it and its group are gone.
        os.close(out_w)
        os.close(err_w)
    return _AgentProcess(popen, trio.lowlevel.FdStream(out_r), trio.lowlevel.FdStream(err_r))


def _primary_group(user: str | int) -> int | None:
    """The primary gid of ``user``, or ``None`` when the user is unknown."""
    import pwd

    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_gid


async def run_agent_process(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    output: SessionOutput | None = None,
    session_timeout: float | None = None,
    grace: float = 5.0,
    kill_timeout: float = 5.0,
    drain_timeout: float = 1.0,
    reap_orphans: bool = False,
    on_spawn: Callable[[int], object] | None = None,
    user: str | int | None = None,
    group: str | int | None = None,
    spawner: Offload | None = None,
) -> AgentResult:
    """Run one agent process to its end and return what it produced.

    Args:
        argv: the command, already rendered; never run by a shell.
        cwd: the working directory (the session's workspace).
        env: the complete environment of the agent (nothing is inherited).
        output: where the output goes; a fresh log-less one when ``None``.
        session_timeout: seconds of execution before the agent is stopped and the
            result says ``timed_out``. Counted from the moment the process
            exists, so it never includes time spent waiting for anything else.
        grace: seconds between SIGTERM and SIGKILL.
        kill_timeout: how long to wait for the child to die after SIGKILL
            before giving up on it (a process stuck in the kernel).
        drain_timeout: how long to keep reading output after the group is gone
            (a descendant that escaped the group may hold the pipes open).
        reap_orphans: reap killed descendants this process inherited; see
            :func:`enable_orphan_reaping`.
        on_spawn: called with the pid as soon as the process exists (the
            worker tells its reaper, DESIGN §3.8).
        user: run the agent as this user (name or uid; needs the privilege
            to switch users, as ``subprocess``'s ``user=``).
        group: run the agent with this group (name or gid); with ``user``
            only, the user's primary group and no supplementary groups.
        spawner: runs the blocking start of the process away from the event
            loop (a `ThreadLane`'s ``run``); ``trio.to_thread.run_sync`` when ``None``.

    Returns:
        the result; a process that could not be started at all yields a result
        with ``exit_code=None`` and ``error`` set, not an exception.

    Raises:
        trio.Cancelled: re-raised after the whole process group is gone.
        Exception: whatever ``output.on_line`` raised, after the same cleanup.
    """
    if output is None:
        output = SessionOutput()
    if session_timeout is not None and not session_timeout > 0:
        raise ValueError(f"session_timeout must be positive, not {session_timeout!r}")
    reap = enable_orphan_reaping() if reap_orphans else False
    argv = list(argv)
    if user is not None and group is None:
        group = _primary_group(user)
    try:
        proc = await _spawn(
            argv,
            spawner,
            cwd=os.fspath(cwd),
            env=dict(env),
            start_new_session=True,
            user=user,
            group=group,
            # another user gets no supplementary group of the worker's
            extra_groups=[] if user is not None else None,
        )
    except (OSError, ValueError, KeyError) as exc:
        message = str(exc)
        if isinstance(exc, OSError) and exc.strerror:
            message = exc.strerror + (f": {exc.filename}" if exc.filename else "")
        error = f"cannot start agent {argv[0]!r}: {message}" if argv else "empty agent command"
        output.note(error)
        output.close()
        return AgentResult(
            exit_code=None,
            result=error,
            tail=output.tail(),
            duration=0.0,
            log_path=output.log_path,
            error=error,
        )

    logger.debug("agent %s started as pid %d (%d args)", argv[0], proc.pid, len(argv))
    if on_spawn is not None:
        on_spawn(proc.pid)
    started = trio.current_time()
    ended = math.nan
    timed_out = False
    splitters = [_LineSplitter(output, "stdout"), _LineSplitter(output, "stderr")]
    streams = [proc.stdout, proc.stderr]
    # The readers are shielded so that output written while the agent handles
    # SIGTERM still reaches the log; they are cancelled explicitly once the
    # group is gone and the pipes are drained (or the drain timed out).
    readers_scopes = [trio.CancelScope(shield=True) for _ in streams]
    readers_done = trio.Event()
    exec_scope = trio.CancelScope()

    readers_left = len(streams)

    async def read(
        stream: trio.abc.ReceiveStream, splitter: _LineSplitter, scope: trio.CancelScope
    ) -> None:
        nonlocal readers_left
        try:
            with scope:
                async with stream:
                    while chunk := await stream.receive_some(_READ_SIZE):
                        try:
                            splitter.feed(chunk)
                        except Exception:
                            # on_line raised: stop the session; the error is re-raised below.
                            exec_scope.cancel()
                            return
        finally:
            readers_left -= 1
            if not readers_left:
                readers_done.set()

    try:
        async with trio.open_nursery() as nursery:
            for stream, splitter, scope in zip(streams, splitters, readers_scopes, strict=True):
                nursery.start_soon(read, stream, splitter, scope)
            try:
                with exec_scope:
                    if session_timeout is not None:
                        exec_scope.deadline = started + session_timeout
                    await proc.wait()
                    ended = trio.current_time()
                timed_out = exec_scope.cancelled_caught and output.callback_error is None
                if timed_out:
                    output.note(f"session timeout after {session_timeout:g}s: stopping the agent")
            finally:
                with trio.CancelScope(shield=True):
                    await _stop_group(
                        proc, output, grace=grace, kill_timeout=kill_timeout, reap=reap
                    )
                    if math.isnan(ended):
                        ended = trio.current_time()
                    with trio.move_on_after(drain_timeout):
                        await readers_done.wait()
                    for scope in readers_scopes:
                        scope.cancel()
    except BaseExceptionGroup as group:
        raise collapse_group(group) from None
    finally:
        for splitter in splitters:
            try:
                splitter.finish()
            except Exception:
                pass  # kept in output.callback_error and raised below
        code = proc.returncode
        proc.close()
        status = "could not be reaped" if code is None else f"exited with code {code}"
        output.note(f"agent {status} after {ended - started:.3f}s")
        output.close()
    if output.callback_error is not None:
        raise output.callback_error
    return AgentResult(
        exit_code=proc.returncode,
        result=output.result_text(),
        tail=output.tail(),
        duration=ended - started,
        timed_out=timed_out,
        log_path=output.log_path,
        pid=proc.pid,
    )
