"""Per-session workspaces: real directories and real git repositories made in the tests."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from supervisor import ConfigError, WorkspaceError
from supervisor._worker._workspace import WorkspaceKind, safe_name
from supervisor.lowlevel import WorkspaceManager

pytestmark = pytest.mark.slow


def git(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"},
    )
    return result.stdout


def commit_file(repo: Path, name: str, text: str) -> None:
    (repo / name).write_text(text)
    git("add", name, cwd=repo)
    git("commit", "-q", "-m", f"add {name}", cwd=repo)


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """A real repository with one commit."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    commit_file(repo, "README.md", "hello\n")
    return repo


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


# ---------------------------------------------------------------- plain workspaces


async def test_concurrent_sessions_get_distinct_directories_that_are_removed(
    tmp_path: Path,
) -> None:
    manager = WorkspaceManager(tmp_path / "state")
    seen: dict[str, Path] = {}
    both_open = trio.Event()

    async def session(session_id: str) -> None:
        async with manager.open(session_id) as path:
            seen[session_id] = path
            (path / "scratch.txt").write_text(session_id)
            if len(seen) == 2:
                assert manager.statistics().active == 2
                both_open.set()
            await both_open.wait()
            assert (path / "scratch.txt").read_text() == session_id

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session, "s1")
        nursery.start_soon(session, "s2")
    assert seen["s1"] != seen["s2"]
    for path in seen.values():
        assert path.parent == manager.root
        assert not path.exists()
    assert entries(manager.root) == []
    stats = manager.statistics()
    assert (stats.active, stats.created, stats.removed) == (0, 2, 2)


async def test_the_same_session_id_twice_gets_two_directories(tmp_path: Path) -> None:
    manager = WorkspaceManager(tmp_path)
    async with manager.open("same") as first, manager.open("same") as second:
        assert first != second
        assert first.name.startswith("same-")


async def test_a_workspace_is_removed_when_the_session_fails(tmp_path: Path) -> None:
    manager = WorkspaceManager(tmp_path)
    with pytest.raises(RuntimeError, match="agent crashed"):
        async with manager.open("s") as path:
            raise RuntimeError("agent crashed")
    assert not path.exists()


async def test_a_workspace_is_removed_when_the_session_is_cancelled(tmp_path: Path) -> None:
    manager = WorkspaceManager(tmp_path)
    with trio.move_on_after(0.05) as scope:
        async with manager.open("s") as path:
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert not path.exists()


async def test_keep_workspaces_leaves_them_on_disk(tmp_path: Path) -> None:
    manager = WorkspaceManager(tmp_path, keep_workspaces=True)
    async with manager.open("s") as path:
        (path / "evidence").write_text("x")
    assert (path / "evidence").read_text() == "x"


async def test_a_sweep_removes_what_a_killed_worker_left_and_spares_live_ones(
    tmp_path: Path, killed_worker_workspace: Callable[..., Path]
) -> None:
    state = tmp_path / "state"
    dead = killed_worker_workspace(state)
    kept = killed_worker_workspace(state, keep=True)
    live = WorkspaceManager(state)
    sweeper = WorkspaceManager(state)
    async with live.open("live") as live_path:
        (live_path / "busy.txt").write_text("running")
        assert await sweeper.sweep() == 1
        assert not dead.parent.exists()  # the dead run's directory, not just the workspace
        assert not (state / "workspaces" / f"{dead.parent.name}.lock").exists()
        # A live manager's lock is held, even by another manager in this process.
        assert (live_path / "busy.txt").read_text() == "running"
        # What a keep_workspaces run kept is the operator's to look at.
        assert (kept / "work.txt").read_text() == "half done"
        assert await sweeper.sweep() == 0
    await live.aclose()
    # Closed: its run directory and lock are gone; only the kept run is left.
    assert entries(state / "workspaces") == [kept.parent.name]


async def test_a_closed_manager_leaves_nothing_and_can_open_again(tmp_path: Path) -> None:
    manager = WorkspaceManager(tmp_path)
    async with manager.open("s"):
        assert entries(manager.workspaces_dir) == sorted(
            [manager.root.name, f"{manager.root.name}.lock"]
        )
    await manager.aclose()
    assert entries(manager.workspaces_dir) == []
    async with manager.open("s") as path:
        assert path.parent == manager.root
    await manager.aclose()
    assert entries(manager.workspaces_dir) == []


async def test_a_run_closed_with_something_left_in_it_is_swept_later(tmp_path: Path) -> None:
    """A removal still going after its timeout: the run stays sweepable, not orphaned."""
    manager = WorkspaceManager(tmp_path)
    async with manager.open("s"):
        pass
    (manager.root / "still-being-removed").mkdir()
    await manager.aclose()
    assert (manager.workspaces_dir / f"{manager.root.name}.lock").exists()
    assert await WorkspaceManager(tmp_path).sweep() == 1
    assert entries(manager.workspaces_dir) == []


async def test_a_sweep_of_a_fresh_state_directory_finds_nothing(tmp_path: Path) -> None:
    assert await WorkspaceManager(tmp_path / "new").sweep() == 0
    assert not (tmp_path / "new").exists()


async def test_read_only_leftovers_are_removed_too(tmp_path: Path) -> None:
    manager = WorkspaceManager(tmp_path)
    async with manager.open("s") as path:
        locked = path / "a" / "b"
        locked.mkdir(parents=True)
        (locked / "f").write_text("x")
        (locked / "f").chmod(0o400)
        locked.chmod(0o500)
        (path / "a").chmod(0o500)
        unlistable = path / "c"
        unlistable.mkdir()
        (unlistable / "g").write_text("y")
        unlistable.chmod(0o000)
    assert not path.exists()


@pytest.mark.parametrize(
    "session_id", ["../../etc", "..", ".", "/etc/passwd", "", "a/b\\c d\x00e", "-rf", "x" * 500]
)
async def test_hostile_session_ids_stay_inside_the_workspace_root(
    tmp_path: Path, session_id: str
) -> None:
    manager = WorkspaceManager(tmp_path / "state")
    async with manager.open(session_id) as path:
        assert path.parent == manager.root
        assert path.resolve().parent == manager.root.resolve()
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*-[0-9a-f]{8}", path.name)
        assert len(path.name) <= 48 + 9
    assert entries(manager.root) == []
    assert entries(tmp_path) == ["state"]


@settings(max_examples=100)
@given(st.text())
def test_safe_name_is_always_a_plain_bounded_file_name(text: str) -> None:
    name = safe_name(text)
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name)
    assert name not in (".", "..")
    assert 1 <= len(name) <= 48


def test_git_workspaces_need_a_base_repository(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="base_repo"):
        WorkspaceManager(tmp_path, kind="git")
    with pytest.raises(ValueError, match="'svn'"):
        WorkspaceManager(tmp_path, kind="svn")


# ---------------------------------------------------------------- git workspaces


async def test_a_git_workspace_is_a_clone_with_the_files_and_is_removed_after(
    tmp_path: Path, upstream: Path
) -> None:
    manager = WorkspaceManager(tmp_path / "state", kind=WorkspaceKind.GIT, base_repo=upstream)
    async with manager.open("s1") as path:
        assert (path / "README.md").read_text() == "hello\n"
        assert git("status", "--porcelain", cwd=path) == ""
        assert git("remote", "get-url", "origin", cwd=path).strip() == str(upstream)
        assert git("log", "--format=%s", cwd=path).strip() == "add README.md"
        # The objects are hardlinked from the warm base, not copied.
        objects = [p for p in (path / ".git" / "objects").rglob("*") if p.is_file()]
        assert objects
        assert all(p.stat().st_nlink > 1 for p in objects)
    assert not path.exists()
    assert entries(manager.root) == []
    assert manager.base_path is not None
    assert (manager.base_path / "HEAD").exists()


async def test_concurrent_git_sessions_share_one_base_clone(tmp_path: Path, upstream: Path) -> None:
    manager = WorkspaceManager(tmp_path / "state", kind="git", base_repo=upstream)
    paths: list[Path] = []

    async def session(i: int) -> None:
        async with manager.open(f"s{i}") as path:
            paths.append(path)
            assert (path / "README.md").exists()

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(session, i)
    assert len(set(paths)) == 4
    stats = manager.statistics()
    assert (stats.base_clones, stats.fetches, stats.removed) == (1, 0, 4)


async def test_changes_in_one_git_workspace_do_not_reach_another(
    tmp_path: Path, upstream: Path
) -> None:
    manager = WorkspaceManager(tmp_path / "state", kind="git", base_repo=upstream)
    async with manager.open("a") as a:
        commit_file(a, "only_in_a.txt", "a\n")
        (a / "README.md").write_text("changed\n")
        async with manager.open("b") as b:
            assert not (b / "only_in_a.txt").exists()
            assert (b / "README.md").read_text() == "hello\n"
    assert git("log", "--format=%s", "-1", cwd=upstream).strip() == "add README.md"


async def test_the_base_fetch_is_debounced(
    tmp_path: Path, upstream: Path, mock_clock: trio.testing.MockClock
) -> None:
    """At most one fetch per interval, shared by the sessions that arrive meanwhile."""
    manager = WorkspaceManager(
        tmp_path / "state", kind="git", base_repo=upstream, fetch_interval=60
    )
    async with manager.open("first"):
        pass
    async with manager.open("second"):
        pass
    assert manager.statistics().fetches == 0  # the base was fresh from its clone

    commit_file(upstream, "new.txt", "new\n")
    mock_clock.jump(61)
    found: list[bool] = []

    async def session(i: int) -> None:
        async with manager.open(f"s{i}") as path:
            found.append((path / "new.txt").exists())

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(session, i)
    assert manager.statistics().fetches == 1
    # The clock stands still, so the others waited for the fetch in flight.
    assert found == [True] * 4

    mock_clock.jump(30)
    async with manager.open("later"):
        pass
    assert manager.statistics().fetches == 1
    mock_clock.jump(31)
    async with manager.open("much later"):
        pass
    assert manager.statistics().fetches == 2


async def test_a_slow_fetch_does_not_hold_up_other_sessions(tmp_path: Path, upstream: Path) -> None:
    """Defect 7 of the reference: no lock is held over the network fetch."""
    hold = tmp_path / "hold-fetches"
    wrapper = tmp_path / "slowgit"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" fetch "*)\n'
        f'  while [ -e "{hold}" ]; do sleep 0.01; done;;\n'
        "esac\n"
        'exec git "$@"\n'
    )
    wrapper.chmod(0o755)
    manager = WorkspaceManager(
        tmp_path / "state",
        kind="git",
        base_repo=upstream,
        git=str(wrapper),
        fetch_interval=0,
        fetch_wait=0.1,
    )
    with trio.fail_after(20):
        async with manager.open("warm-up-creates-the-base"):
            pass
        fetches_before = manager.statistics().fetches
        hold.touch()
        fetcher_done = trio.Event()

        async def fetching_session() -> None:
            async with manager.open("fetcher") as path:
                assert (path / "README.md").exists()
            fetcher_done.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetching_session)
                while manager.statistics().fetches == fetches_before:
                    await trio.sleep(0.01)
                async with manager.open("bystander") as path:
                    assert (path / "README.md").exists()
                assert not fetcher_done.is_set(), "the fetch should still be held"
                hold.unlink()
        finally:
            hold.unlink(missing_ok=True)
    assert fetcher_done.is_set()


async def test_a_failing_fetch_is_logged_and_the_session_goes_on(
    tmp_path: Path, upstream: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = WorkspaceManager(tmp_path / "state", kind="git", base_repo=upstream, fetch_interval=0)
    async with manager.open("creates-base"):
        pass
    assert manager.base_path is not None
    git("remote", "set-url", "origin", str(tmp_path / "gone"), cwd=manager.base_path)
    async with manager.open("s") as path:
        assert (path / "README.md").exists()
    assert manager.statistics().fetch_failures >= 1
    assert "fetching the git base failed" in caplog.text


async def test_a_cancelled_fetch_leaves_no_git_process_and_frees_the_slot(
    tmp_path: Path, upstream: Path
) -> None:
    hang = tmp_path / "hang-fetches"
    pidfile = tmp_path / "fetch.pid"
    wrapper = tmp_path / "hanggit"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ -e "{hang}" ]; then case " $* " in *" fetch "*)\n'
        f'  echo $$ > "{pidfile}"; exec sleep 1000;;\n'
        "esac; fi\n"
        'exec git "$@"\n'
    )
    wrapper.chmod(0o755)
    manager = WorkspaceManager(
        tmp_path / "state", kind="git", base_repo=upstream, git=str(wrapper), fetch_interval=0
    )
    with trio.fail_after(20):
        async with manager.open("creates-base"):
            pass
    hang.touch()
    with trio.move_on_after(0.5) as scope:
        async with manager.open("cancelled"):
            pytest.fail("the fetch should have hung")
    assert scope.cancelled_caught
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists()
    assert entries(manager.root) == []
    # The next session is not stuck behind the dead fetch.
    hang.unlink()
    with trio.fail_after(20):
        async with manager.open("next") as path:
            assert (path / "README.md").exists()


async def test_a_missing_base_repository_is_a_configuration_error(tmp_path: Path) -> None:
    manager = WorkspaceManager(tmp_path / "state", kind="git", base_repo=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no such directory"):
        async with manager.open("s"):
            pytest.fail("unreachable")
    assert entries(manager.root) == []


async def test_a_base_that_is_not_a_repository_is_a_workspace_error(tmp_path: Path) -> None:
    not_a_repo = tmp_path / "plain"
    not_a_repo.mkdir()
    manager = WorkspaceManager(tmp_path / "state", kind="git", base_repo=not_a_repo)
    with pytest.raises(WorkspaceError, match="git clone failed"):
        async with manager.open("s"):
            pytest.fail("unreachable")
    assert entries(manager.root) == []
    assert manager.base_path is not None
    assert entries(manager.base_path.parent) == []


async def test_credentials_in_a_remote_url_never_reach_error_messages(tmp_path: Path) -> None:
    url = "https://user:hunter2-token@127.0.0.1:9/repo.git"
    manager = WorkspaceManager(tmp_path / "state", kind="git", base_repo=url, git_timeout=20)
    with pytest.raises(WorkspaceError) as info:
        async with manager.open("s"):
            pytest.fail("unreachable")
    assert "hunter2" not in str(info.value)


async def test_a_base_left_by_an_earlier_run_is_reused_and_fetched(
    tmp_path: Path, upstream: Path
) -> None:
    first = WorkspaceManager(tmp_path / "state", kind="git", base_repo=upstream)
    async with first.open("s"):
        pass
    commit_file(upstream, "later.txt", "later\n")
    second = WorkspaceManager(tmp_path / "state", kind="git", base_repo=upstream)
    async with second.open("s") as path:
        assert (path / "later.txt").exists()
    stats = second.statistics()
    assert (stats.base_clones, stats.fetches) == (0, 1)


async def test_workspaces_are_private_to_the_worker_user(tmp_path: Path) -> None:
    async with WorkspaceManager(tmp_path).open("s") as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


async def test_short_steps_go_through_the_offload_and_a_full_tree_through_a_thread(
    tmp_path: Path,
) -> None:
    """mkdir and the rmdir of an empty workspace use ``offload``; files fall back to rmtree."""
    calls: list[str] = []

    async def offload(function: Any, *args: Any) -> Any:
        calls.append(getattr(function, "__name__", repr(function)))
        return function(*args)

    manager = WorkspaceManager(tmp_path, offload=offload)
    async with manager.open("empty") as empty:
        assert empty.is_dir()
    async with manager.open("full") as full:
        (full / "sub").mkdir()
        (full / "sub" / "f.txt").write_text("x")
    assert calls == ["make", "_remove_if_empty", "make", "_remove_if_empty"]
    assert not empty.exists()
    assert not full.exists()  # the offloaded rmdir refused; the tree went in a thread
    stats = manager.statistics()
    assert (stats.created, stats.removed, stats.active) == (2, 2, 0)


async def test_a_sweep_spares_a_dead_run_that_a_live_process_still_works_in(
    tmp_path: Path, killed_worker_workspace: Callable[..., Path]
) -> None:
    """An agent that outlived its worker keeps its workspace until it is gone."""
    state = tmp_path / "state"
    orphaned = killed_worker_workspace(state)
    (orphaned / "sub").mkdir()
    sweeper = WorkspaceManager(state)
    # one process works in the directory, another only holds a file open in it
    in_cwd = await trio.lowlevel.open_process(["sleep", "60"], cwd=orphaned / "sub")
    holder = await trio.lowlevel.open_process(
        ["sh", "-c", "exec 3<work.txt; exec sleep 60"], cwd=orphaned
    )
    try:
        await trio.sleep(0.2)  # the shell has opened the file and exec'd
        for process in (in_cwd, holder):
            assert await sweeper.sweep() == 0
            assert (orphaned / "work.txt").read_text() == "half done"
            process.kill()
            await process.wait()
        assert await sweeper.sweep() == 1  # nobody uses it any more
        assert not orphaned.exists()
    finally:
        for process in (in_cwd, holder):
            if process.returncode is None:
                process.kill()
                await process.wait()
        await sweeper.aclose()
