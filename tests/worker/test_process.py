"""The agent process runner, with real subprocesses (the scripts in ``tests/agents/``).

What these tests pin down: exit codes and results, bounded memory whatever an
agent prints, non-UTF-8 output, and above all that stopping an agent (cancel,
timeout, or its own exit) leaves no process of its group behind: ``/proc`` is
scanned directly, and a zombie counts as alive until someone reaped it.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings, strategies as st

from supervisor._base._lane import ThreadLane
from supervisor._worker._process import _LineSplitter, run_agent_process
from supervisor.controlplane import OutcomeStatus
from supervisor.lowlevel import AgentResult, SessionOutput

AGENTS = Path(__file__).resolve().parents[1] / "agents"
GRACE = 0.2

pytestmark = pytest.mark.slow


def agent(name: str, *args: str) -> list[str]:
    return [sys.executable, str(AGENTS / f"{name}.py"), *args]


def proc_group(pgid: int) -> list[tuple[int, str]]:
    """Every process of group ``pgid`` in /proc, zombies included, as (pid, state)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid:
            found.append((int(entry), fields[0].decode()))
    return found


def process_exists(pid: int) -> bool:
    """Whether ``pid`` is in /proc at all (a zombie still counts)."""
    return Path(f"/proc/{pid}").exists()


def ready_fields(line: str) -> dict[str, int]:
    """``ready pid=1 pgid=1 grandchild=2`` -> ``{"pid": 1, ...}``."""
    return {k: int(v) for k, v in (part.split("=") for part in line.split()[1:])}


async def run(
    argv: list[str],
    tmp_path: Path,
    *,
    output: SessionOutput | None = None,
    env: dict[str, str] | None = None,
    **kwargs: object,
) -> AgentResult:
    return await run_agent_process(
        argv,
        cwd=tmp_path,
        env=env if env is not None else {"PATH": os.environ["PATH"]},
        output=output if output is not None else SessionOutput(log_path=tmp_path / "s.log"),
        grace=GRACE,
        reap_orphans=True,
        **kwargs,  # type: ignore[arg-type]
    )


class Ready:
    """An ``on_line`` hook that remembers the agent's ``ready ...`` line."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.fields: dict[str, int] = {}
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("ready "):
            self.fields = ready_fields(line)
            self.event.set()


async def cancel_when_ready(
    argv: list[str], tmp_path: Path, *, settle: float = 0.05
) -> tuple[Ready, trio.CancelScope, SessionOutput]:
    """Start the agent, cancel the run once it said ready; return what happened."""
    ready = Ready()
    output = SessionOutput(log_path=tmp_path / "s.log", on_line=ready)
    reached_end = False
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def session() -> None:
                nonlocal reached_end
                with scope:
                    await run(argv, tmp_path, output=output)
                    reached_end = True

            nursery.start_soon(session)
            await ready.event.wait()
            await trio.sleep(settle)
            scope.cancel()
    assert not reached_end, "cancellation was swallowed: the run returned normally"
    return ready, scope, output


# ---------------------------------------------------------------- exit codes and results


async def test_ok_agent_completes_with_the_last_json_result(tmp_path: Path) -> None:
    result = await run(agent("ok", "hello world"), tmp_path)
    assert result.exit_code == 0
    assert result.status is OutcomeStatus.COMPLETED
    assert result.result == "done: hello world"
    assert "step 1/3" in result.tail
    assert result.tail[-1] == "bye"
    assert result.duration > 0
    assert result.log_path == tmp_path / "s.log"
    assert result.pid is not None
    outcome = result.to_outcome()
    assert (outcome.status, outcome.exit_code, outcome.result) == (
        OutcomeStatus.COMPLETED,
        0,
        "done: hello world",
    )
    log = (tmp_path / "s.log").read_text()
    assert "step 3/3\n" in log
    assert "[supervisor] agent exited with code 0" in log


async def test_crashing_agent_fails_with_its_exit_code_and_tail_as_result(
    tmp_path: Path,
) -> None:
    result = await run(agent("crash"), tmp_path)
    assert result.exit_code == 3
    assert result.status is OutcomeStatus.FAILED
    assert result.reason == "exit code 3"
    # stdout and stderr are separate pipes: their relative order is not kept.
    assert sorted(result.result.split("\n")) == ["something broke", "working"]
    assert "[stderr] something broke\n" in (tmp_path / "s.log").read_text()
    assert result.to_outcome().exit_code == 3


async def test_non_json_and_resultless_json_lines_are_not_results(tmp_path: Path) -> None:
    code = "import json; print(json.dumps({'type': 'x'})); print('{not json \"result\"')"
    result = await run([sys.executable, "-c", code], tmp_path)
    assert result.result == '{"type": "x"}\n{not json "result"'


async def test_a_result_that_is_not_a_string_is_returned_as_json(tmp_path: Path) -> None:
    code = "import json; print(json.dumps({'result': {'n': [1, 2]}}))"
    result = await run([sys.executable, "-c", code], tmp_path)
    assert json.loads(result.result) == {"n": [1, 2]}


async def test_result_lines_on_stderr_do_not_count(tmp_path: Path) -> None:
    code = "import sys; print('{\"result\": \"on stderr\"}', file=sys.stderr); print('plain')"
    result = await run([sys.executable, "-c", code], tmp_path)
    assert sorted(result.result.split("\n")) == ["plain", '{"result": "on stderr"}']


async def test_an_agent_that_cannot_start_is_a_failed_result(tmp_path: Path) -> None:
    result = await run([str(tmp_path / "no-such-agent")], tmp_path)
    assert result.exit_code is None
    assert result.status is OutcomeStatus.FAILED
    assert result.error is not None
    assert "cannot start agent" in result.error
    assert "No such file" in result.error


async def test_a_missing_workspace_is_named_in_the_start_error(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    result = await run_agent_process(agent("ok"), cwd=missing, env={})
    assert result.status is OutcomeStatus.FAILED
    assert result.error is not None
    assert str(missing) in result.error


async def test_stdin_is_empty_and_cwd_is_the_workspace(tmp_path: Path) -> None:
    code = "import os, sys; print(repr(sys.stdin.read())); print(os.getcwd())"
    result = await run([sys.executable, "-c", code], tmp_path)
    assert result.tail == ("''", str(tmp_path))


async def test_a_signal_death_is_reported_by_name(tmp_path: Path) -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    result = await run([sys.executable, "-c", code], tmp_path)
    assert result.exit_code == -9
    assert result.status is OutcomeStatus.FAILED
    assert result.reason == "killed by SIGKILL"


# ---------------------------------------------------------------- termination


@pytest.mark.parametrize(
    ("name", "args", "expect_sigkill"),
    [
        ("hang", (), False),
        ("term_handler", (), False),
        ("ignore_sigterm", (), True),
        ("grandchild", ("wait",), True),
    ],
)
async def test_cancel_leaves_no_process_of_the_group(
    tmp_path: Path, name: str, args: tuple[str, ...], expect_sigkill: bool
) -> None:
    ready, scope, _ = await cancel_when_ready(agent(name, *args), tmp_path)
    assert scope.cancelled_caught
    pgid = ready.fields["pgid"]
    assert pgid == ready.fields["pid"], "the agent must lead its own process group"
    assert proc_group(pgid) == []
    if "grandchild" in ready.fields:
        assert not process_exists(ready.fields["grandchild"])
    log = (tmp_path / "s.log").read_text()
    assert ("sent SIGKILL" in log) is expect_sigkill


async def test_sigterm_handling_output_still_reaches_the_log(tmp_path: Path) -> None:
    """Output the agent writes while handling SIGTERM is not lost to the cancellation."""
    _, _, output = await cancel_when_ready(agent("term_handler"), tmp_path)
    assert output.tail()[-1] == "terminating"
    assert "terminating\n" in (tmp_path / "s.log").read_text()


async def test_ignoring_sigterm_costs_exactly_the_grace_then_sigkill(tmp_path: Path) -> None:
    start = trio.current_time()
    await cancel_when_ready(agent("ignore_sigterm"), tmp_path, settle=0)
    log = (tmp_path / "s.log").read_text()
    assert "got SIGTERM, ignoring it" in log
    assert "agent ignored SIGTERM for 0.2s" in log
    assert "exited with code -9" in log
    assert trio.current_time() - start >= GRACE


async def test_a_grandchild_left_behind_by_a_finished_agent_is_stopped(tmp_path: Path) -> None:
    ready = Ready()
    output = SessionOutput(log_path=tmp_path / "s.log", on_line=ready)
    with trio.fail_after(30):
        result = await run(agent("grandchild", "exit"), tmp_path, output=output)
    assert result.exit_code == 0
    assert result.status is OutcomeStatus.COMPLETED
    assert proc_group(ready.fields["pgid"]) == []
    assert not process_exists(ready.fields["grandchild"])
    log = (tmp_path / "s.log").read_text()
    assert "stopping the processes it left behind" in log
    assert "sent SIGKILL" in log


async def test_session_timeout_stops_the_agent_and_says_so(tmp_path: Path) -> None:
    ready = Ready()
    output = SessionOutput(log_path=tmp_path / "s.log", on_line=ready)
    with trio.fail_after(30):
        result = await run(agent("hang"), tmp_path, output=output, session_timeout=0.3)
    assert result.timed_out
    assert result.status is OutcomeStatus.TIMEOUT
    assert result.exit_code == -15
    assert result.reason is not None
    assert result.reason.startswith("session timeout")
    assert result.duration >= 0.3
    assert proc_group(ready.fields["pgid"]) == []


async def test_an_agent_finishing_within_the_timeout_completes(tmp_path: Path) -> None:
    result = await run(agent("slow_ok", "0.2"), tmp_path, session_timeout=10)
    assert not result.timed_out
    assert result.status is OutcomeStatus.COMPLETED
    assert result.result == "slept 0.2"


async def test_on_line_sees_a_wedge_line_while_the_agent_still_runs(tmp_path: Path) -> None:
    """The hook a wedge detector uses: it can stop a silent agent from a printed line."""
    seen: list[str] = []
    scope = trio.CancelScope()

    def detector(line: str) -> None:
        seen.append(line)
        if "control request timeout" in line.lower():
            scope.cancel()

    output = SessionOutput(on_line=detector)
    with trio.fail_after(30), scope:
        await run(agent("wedge"), tmp_path, output=output)
    assert scope.cancelled_caught
    pgid = ready_fields(seen[0])["pgid"]
    assert proc_group(pgid) == []


async def test_an_on_line_error_stops_the_agent_and_propagates_unwrapped(tmp_path: Path) -> None:
    pgids: list[int] = []

    def explode(line: str) -> None:
        pgids.append(ready_fields(line)["pgid"])
        raise RuntimeError("watcher broke")

    with trio.fail_after(30), pytest.raises(RuntimeError, match="watcher broke"):
        await run(agent("hang"), tmp_path, output=SessionOutput(on_line=explode))
    assert proc_group(pgids[0]) == []


# ---------------------------------------------------------------- output volume and bytes


def _rss_bytes() -> int:
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_a_flood_of_output_does_not_grow_memory(tmp_path: Path) -> None:
    """200 MB of lines and one 100 MB line without a newline: bounded memory, full log."""
    lines_mb, long_mb = 200, 100
    truncated: list[str] = []

    def on_line(line: str) -> None:
        if line.endswith("[line truncated]"):
            truncated.append(line[:10])

    output = SessionOutput(
        log_path=tmp_path / "flood.log", tail_lines=100, tail_chars=10_000, on_line=on_line
    )
    baseline = _rss_bytes()
    peak = baseline
    done = trio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        with trio.fail_after(60):
            result = await run(agent("flood", str(lines_mb), str(long_mb)), tmp_path, output=output)
        done.set()
    assert result.exit_code == 0
    assert result.result == "flood done"
    assert peak - baseline < 48 * 1024 * 1024, f"RSS grew by {(peak - baseline) >> 20} MiB"
    assert len(result.tail) <= 100
    assert sum(map(len, result.tail)) <= 10_000
    assert output.truncated_lines == 1
    assert truncated == ["y" * 10]
    expected = (lines_mb + long_mb) * 1024 * 1024 + len(b'{"result": "flood done"}\n')
    assert output.bytes_received == expected
    log_size = (tmp_path / "flood.log").stat().st_size
    assert log_size >= expected


async def test_a_long_line_is_cut_for_watchers_but_whole_in_the_log(tmp_path: Path) -> None:
    lines: list[str] = []
    output = SessionOutput(log_path=tmp_path / "s.log", on_line=lines.append, max_line_chars=1000)
    code = "import sys; sys.stdout.write('a' * 5000 + '\\nshort\\n' + 'b' * 3000)"
    await run([sys.executable, "-c", code], tmp_path, output=output)
    assert lines[:3] == [
        "a" * 1000 + " [line truncated]",
        "short",
        "b" * 1000 + " [line truncated]",
    ]
    log = (tmp_path / "s.log").read_text()
    assert log.startswith("a" * 5000 + "\nshort\n" + "b" * 3000 + "\n")


async def test_non_utf8_bytes_are_replaced_not_fatal(tmp_path: Path) -> None:
    result = await run(agent("non_utf8"), tmp_path)
    assert result.exit_code == 0
    assert result.result == "bytes \ufffd survived"
    assert "caf\ufffd \ufffd\ufffd broken \ufffd( end" in result.tail
    assert "err \ufffd\ufffd" in result.tail
    assert "no newline at the end \ufffd" in result.tail
    raw = (tmp_path / "s.log").read_bytes()
    assert b"caf\xe9 \xff\xfe broken \xc3\x28 end\n" in raw
    assert b"[stderr] err \x80\x81\n" in raw


# ---------------------------------------------------------------- the line splitter


@settings(max_examples=100)
@given(
    data=st.binary(max_size=400).map(lambda b: b.replace(b"\r", b"")),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    cap=st.integers(min_value=1, max_value=50),
)
def test_lines_and_log_do_not_depend_on_how_output_is_chunked(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, cuts: list[int], cap: int
) -> None:
    """Any chunking of the same bytes gives the same lines and the same log."""

    def collect(chunks: list[bytes], log: Path) -> tuple[list[str], bytes]:
        lines: list[str] = []
        output = SessionOutput(log_path=log, on_line=lines.append, max_line_chars=cap)
        splitter = _LineSplitter(output, "stdout")
        for chunk in chunks:
            splitter.feed(chunk)
        splitter.finish()
        output.close()
        return lines, log.read_bytes() if log.exists() else b""

    base = tmp_path_factory.mktemp("split")
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    whole = collect([data], base / "whole.log")
    pieces = collect(chunks, base / "pieces.log")
    assert pieces == whole
    lines, log = whole
    assert log == (data + b"\n" if data and not data.endswith(b"\n") else data)
    assert all(len(line) <= cap + len(" [line truncated]") for line in lines)


def test_the_tail_keeps_the_newest_lines_within_both_bounds() -> None:
    output = SessionOutput(tail_lines=5, tail_chars=21)
    for i in range(50):
        output.emit(f"line {i}")
    assert output.tail() == ("line 47", "line 48", "line 49")
    output.emit("x" * 100)
    assert output.tail() == ("x" * 21,)


def test_emit_splits_text_into_lines_and_finds_results() -> None:
    seen: list[str] = []
    output = SessionOutput(on_line=seen.append)
    output.emit('one\n{"result": "r1"}\ntwo')
    assert seen == ["one", '{"result": "r1"}', "two"]
    assert output.result_text() == "r1"


def test_open_log_creates_the_file_before_any_output(tmp_path: Path) -> None:
    output = SessionOutput(log_path=tmp_path / "logs" / "s.log")
    output.open_log()
    assert (tmp_path / "logs" / "s.log").exists()
    output.note("started")
    output.close()
    assert (tmp_path / "logs" / "s.log").read_bytes() == b"[supervisor] started\n"


def test_open_log_failing_disables_the_log_and_keeps_the_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    output = SessionOutput(log_path=blocker / "s.log")
    output.open_log()
    output.emit("still counted")
    output.close()
    assert output.tail() == ("still counted",)
    assert sum("session log" in r.message for r in caplog.records) == 1


async def test_a_flooding_agent_cannot_fill_the_disk_with_its_log(tmp_path: Path) -> None:
    """64 MB of output under a 1 MiB cap: log and log.1 stay under it, the end is kept."""
    cap = 1024 * 1024
    output = SessionOutput(log_path=tmp_path / "flood.log", log_max_bytes=cap)
    with trio.fail_after(60):
        result = await run(agent("flood", "60", "4"), tmp_path, output=output)
    assert result.exit_code == 0
    assert result.result == "flood done"  # the result line is still found
    log, older = tmp_path / "flood.log", tmp_path / "flood.log.1"
    assert log.stat().st_size + older.stat().st_size <= cap + 512
    assert output.rotations > 50
    text = log.read_bytes()
    assert text.startswith(b"[supervisor] log rotated")
    assert b"agent exited with code 0" in text  # the very end of the run is there
    assert output.bytes_received > 60 * cap


async def test_an_uncapped_log_is_never_rotated(tmp_path: Path) -> None:
    output = SessionOutput(log_path=tmp_path / "ok.log")
    await run(agent("flood", "2", "0"), tmp_path, output=output)
    assert output.rotations == 0
    assert not (tmp_path / "ok.log.1").exists()
    assert (tmp_path / "ok.log").stat().st_size > 2 * 1024 * 1024


def test_with_a_writer_log_writes_and_the_close_leave_the_caller_in_order(
    tmp_path: Path,
) -> None:
    """Nothing touches the file until the writer runs the queued calls, in order."""
    queued: list[object] = []

    def writer(call: object) -> None:
        queued.append(call)

    log = tmp_path / "logs" / "s.log"
    output = SessionOutput(log_path=log, writer=writer, log_max_bytes=200)
    output.note("starting")
    output.emit("line one\nline two")
    output.emit("x" * 70)  # past half the cap: the writer's thread rotates the file
    output.close()
    assert output.queued and not log.exists()
    assert output.tail() == ("line one", "line two", "x" * 70)  # the tail is kept at once
    for call in queued:
        assert callable(call)
        call()
    assert log.exists() and (tmp_path / "logs" / "s.log.1").exists()
    rotated = (tmp_path / "logs" / "s.log.1").read_text()
    assert rotated == "[supervisor] starting\nline one\nline two\n"
    assert log.read_text().endswith("x" * 70 + "\n")
    assert output.rotations == 1


def test_with_a_writer_what_is_asked_before_a_flush_starts_goes_with_it(tmp_path: Path) -> None:
    """The open, the lines and the close of a short session cost one hand-over."""
    queued: list[Callable[[], object]] = []
    log = tmp_path / "s.log"
    output = SessionOutput(log_path=log, writer=queued.append)
    output.start_log()
    output.note("agent started")
    output.emit("one\ntwo")
    output.close()
    output.close()  # nothing written since: nothing more to hand over
    assert len(queued) == 1
    behind = not output.caught_up
    assert behind and not log.exists()
    queued.pop()()
    assert output.caught_up
    assert log.read_text() == "[supervisor] agent started\none\ntwo\n"
    output.emit("three")  # after the flush started: a flush of its own, reopening the log
    behind = not output.caught_up
    assert len(queued) == 1 and behind
    queued.pop()()
    output.close()
    queued.pop()()
    assert output.caught_up and not queued
    assert log.read_text().endswith("two\nthree\n")


def test_a_flush_started_meanwhile_leaves_later_writes_to_the_next(tmp_path: Path) -> None:
    """A write made while the writer's thread runs a flush is never lost: the flush
    took what was there when it started, and the write gets a flush of its own."""

    class RacingOutput(SessionOutput):
        def open_log(self) -> None:  # the caller writes while the flush opens the file
            if not self.lines:
                self.emit("second")
            super().open_log()

    queued: list[Callable[[], object]] = []
    log = tmp_path / "s.log"
    output = RacingOutput(log_path=log, writer=queued.append)
    output.start_log()
    output.note("first")
    queued.pop()()
    assert len(queued) == 1  # "second" came after the flush had started
    queued.pop()()
    output.close()
    queued.pop()()
    assert log.read_text() == "[supervisor] first\nsecond\n"
    assert output.caught_up


def test_a_writer_that_takes_no_more_leaves_the_write_to_the_caller(tmp_path: Path) -> None:
    def closed(call: object) -> None:
        raise RuntimeError("thread lane 'io' is closed")

    log = tmp_path / "s.log"
    output = SessionOutput(log_path=log, writer=closed)
    output.emit("still written")
    output.close()
    assert not output.queued
    assert log.read_text() == "still written\n"


# ---------------------------------------------------------------- starting the process


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
async def test_no_descriptor_outlives_a_run_whatever_its_end(tmp_path: Path) -> None:
    before = open_fds()
    assert (await run(agent("ok"), tmp_path)).status is OutcomeStatus.COMPLETED
    assert (await run([str(tmp_path / "no-such-agent")], tmp_path)).exit_code is None
    await cancel_when_ready(agent("hang"), tmp_path)
    with trio.CancelScope() as scope:
        scope.cancel()  # cancelled before it starts: nothing is started
        await run(agent("ok"), tmp_path)
    assert open_fds() == before


async def test_a_spawner_runs_the_start_instead_of_a_trio_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[object] = []
    real = trio.to_thread.run_sync

    async def counting(fn: object, *args: object, **kwargs: object) -> object:
        threads.append(fn)
        return await real(fn, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    lane = ThreadLane("test-spawn")
    started: list[object] = []

    async def spawner(fn: Callable[[], object]) -> object:
        started.append(fn)
        return await lane.run(fn)

    try:
        result = await run(agent("ok"), tmp_path, spawner=spawner)
        assert result.status is OutcomeStatus.COMPLETED
        assert len(started) == 1
        assert threads == []
        # without one, the start takes a Trio worker thread, as trio.lowlevel.open_process does
        assert (await run(agent("ok"), tmp_path)).status is OutcomeStatus.COMPLETED
        assert len(threads) == 1
    finally:
        await lane.aclose()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_a_start_as_another_user_through_a_spawner(tmp_path: Path) -> None:
    lane = ThreadLane("test-spawn")
    try:
        code = "import os; print(os.getuid(), os.getgid(), os.getgroups())"
        result = await run([sys.executable, "-c", code], tmp_path, user=0, spawner=lane.run)
    finally:
        await lane.aclose()
    assert result.tail == ("0 0 []",)


async def test_without_a_pidfd_the_exit_is_still_awaited_and_cancel_still_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor._worker import _process

    monkeypatch.setattr(_process, "_HAS_PIDFD", False)
    result = await run(agent("crash"), tmp_path)
    assert result.exit_code == 3
    ready, scope, _ = await cancel_when_ready(agent("hang"), tmp_path)
    assert scope.cancelled_caught
    assert proc_group(ready.fields["pgid"]) == []
