"""A fleet on PostgreSQL, for real: ``serve --database`` replicas, worker processes, real agents.

* One of two replicas is SIGKILLed while four workers run a hundred items through
  both: every item completes exactly once and no session is lost to the replica's
  death (the workers move on to the other replica).
* The database server itself restarts mid-run (a private cluster this test owns,
  started with ``initdb``/``pg_ctl``): workers talking to it directly ride it out.
* An agent of a worker on the database never sees its password.

Real processes and real time; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_db import private_schema

from supervisor.controlplane import OutcomeStatus, WorkState
from supervisor.controlplane._store import Store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "tests" / "agents" / "slow_ok.py"
KEY = "fleet-test-key-0123456789abcdef"
ENV = "default"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
    env["PYTHONPATH"] = str(ROOT)
    env["SUPERVISOR_ENVIRONMENT_KEY"] = KEY
    env.update(extra)
    return env


def _store(url: str):  # type: ignore[no-untyped-def]
    from supervisor.controlplane._store._postgres import PostgresStore

    return PostgresStore(url)


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _serve(procs: list[subprocess.Popen[str]], url: str, tmp: Path, n: int) -> str:
    with (tmp / f"serve-{n}.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "serve", "--database", url, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=_env(),
            cwd=tmp,
        )
    procs.append(proc)
    assert proc.stdout is not None
    base = proc.stdout.readline().strip()
    assert base.startswith("http://"), f"replica {n} did not start: {base!r}"
    return base


def _worker(
    procs: list[subprocess.Popen[str]],
    control_planes: list[str],
    tmp: Path,
    n: int,
    *,
    ttl: float = 20.0,
) -> subprocess.Popen[str]:
    flags = [arg for url in control_planes for arg in ("--control-plane", url)]
    with (tmp / f"worker-{n}.log").open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "supervisor", "run", *flags,
                "--state-dir", str(tmp / f"worker-{n}"),
                "--agent", f"{sys.executable} {AGENT} {{prompt}}",
                "--max-concurrency", "4", "--lease-ttl", str(ttl), "--no-api",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
            env=_env(),
            cwd=tmp,
        )  # fmt: skip
    procs.append(proc)
    return proc


def _wait_for(what: str, check, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _stopped(store: Store, ids: set[str]) -> int:
    items = store.list_work(ENV, now=0.0, state=WorkState.STOPPED, limit=1000)
    return sum(item.id in ids for item in items)


def _assert_each_completed_once(
    store: Store,
    ids: set[str],
    *,
    first_attempt: bool = True,
) -> None:
    items = {i.id: i for i in store.list_work(ENV, now=0.0, limit=1000) if i.id in ids}
    assert set(items) == ids
    bad = {
        i.id: (i.state, i.attempts, i.outcome)
        for i in items.values()
        if i.state is not WorkState.STOPPED
        or i.outcome is None
        or i.outcome.status is not OutcomeStatus.COMPLETED
        or (first_attempt and i.attempts != 0)
    }
    assert bad == {}, "items not completed exactly once"


_SESSION_END = re.compile(r"\(work item (work_\w+)\) ended: (\w+)(.*)")


def _session_ends(tmp: Path) -> list[tuple[str, str, str]]:
    """``(work id, how it ended, detail)`` for every session the workers' logs report."""
    ends = []
    for log in sorted(tmp.glob("worker-*.log")):
        for line in log.read_text().splitlines():
            if found := _SESSION_END.search(line):
                ends.append((found[1], found[2], found[3]))
    return ends


def test_sigkill_of_one_replica_loses_no_session(tmp_path: Path) -> None:
    """Every agent runs once and completes; no running session is cancelled.

    What a replica's death can still cost, by the contract: a first heartbeat the
    dead replica committed but never answered leaves its retry with a stale token
    (412), so that session never starts and its item runs again elsewhere after its
    ack lease. The agent never ran there, so every agent still ran exactly once.
    """
    with private_schema() as url:
        store = _store(url)
        try:
            ids = {store.submit(ENV, "0.8", now=0.0).id for _ in range(100)}
            with _processes() as procs:
                first = _serve(procs, url, tmp_path, 0)
                second = _serve(procs, url, tmp_path, 1)
                victim = procs[0]
                for n in range(4):
                    order = [first, second] if n % 2 == 0 else [second, first]
                    _worker(procs, order, tmp_path, n)
                _wait_for("a fifth of the items", lambda: _stopped(store, ids) >= 20, 120)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                _wait_for("every item", lambda: _stopped(store, ids) == len(ids), 180)
                for worker in procs[2:]:
                    assert worker.poll() is None, "a worker died with the replica"
            _assert_each_completed_once(store, ids, first_attempt=False)
        finally:
            store.close()
    ends = _session_ends(tmp_path)
    ran = Counter(work_id for work_id, how, _ in ends if how == "completed")
    assert ran == Counter(dict.fromkeys(ids, 1)), "an agent ran twice, or never"
    cancelled = [end for end in ends if end[1] != "completed" and "did not start" not in end[2]]
    assert cancelled == [], "a running session was cancelled by the replica's death"


# --- a private PostgreSQL cluster, restarted mid-run -------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_postgres_user() -> dict[str, object]:
    """``initdb`` refuses root: run the cluster as the ``postgres`` account when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres account to own a private cluster")
    return {"user": account.pw_uid, "group": account.pw_gid}


@contextlib.contextmanager
def _private_cluster() -> Iterator[tuple[str, list[str], list[str]]]:
    """A throw-away cluster: its URL, and the commands that stop and start it.

    Its files live in a directory of their own under the system temporary
    directory (pytest's is private to root, and the cluster may run as ``postgres``).
    """
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL server binaries in {PG_BIN}: cannot own a private cluster")
    run_as = _as_postgres_user()
    root = Path(tempfile.mkdtemp(prefix="supervisor-pg-"))
    data = root / "pgdata"
    data.mkdir()
    sockets = root / "pgsock"
    sockets.mkdir()
    if run_as:
        for path in (root, data, sockets):
            os.chown(path, run_as["user"], run_as["group"])  # type: ignore[arg-type]
            path.chmod(0o700)
    port = _free_port()
    subprocess.run(
        [str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True, capture_output=True, **run_as,  # type: ignore[call-overload]
    )  # fmt: skip
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    log = root / "pg.log"
    start = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]
    stop = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
    subprocess.run(start, check=True, capture_output=True, **run_as)  # type: ignore[call-overload]
    try:
        yield (f"postgresql://postgres@127.0.0.1:{port}/postgres", stop, start)
    finally:
        subprocess.run(stop, capture_output=True, **run_as)  # type: ignore[call-overload]
        shutil.rmtree(root, ignore_errors=True)


def test_workers_ride_out_a_database_restart(tmp_path: Path) -> None:
    with _private_cluster() as (url, stop, start):
        run_as = _as_postgres_user()
        store = _store(url)
        try:
            # Sessions of 4 s on a 6 s lease (a heartbeat every 2 s): the outage below
            # falls on running sessions' heartbeats and on new claims alike.
            ids = {store.submit(ENV, "4.0", now=0.0).id for _ in range(16)}
            with _processes() as procs:
                for n in range(2):
                    _worker(procs, [url], tmp_path, n, ttl=6.0)
                _wait_for("the first items", lambda: _stopped(store, ids) >= 4, 120)
                # Down for 2.5 s: within half of the 6 s ttl.
                subprocess.run(stop, check=True, capture_output=True, **run_as)  # type: ignore[call-overload]
                time.sleep(2.5)
                subprocess.run(start, check=True, capture_output=True, **run_as)  # type: ignore[call-overload]
                _wait_for("every item", lambda: _retrying(store, ids), 180)
                for worker in procs:
                    assert worker.poll() is None, "a worker died with the database"
            _assert_each_completed_once(store, ids)
        finally:
            store.close()


def _retrying(store, ids: set[str]) -> bool:  # type: ignore[no-untyped-def]
    from supervisor.controlplane._exceptions import TransientError

    try:
        return bool(_stopped(store, ids) == len(ids))
    except TransientError:
        return False


# --- secrets ------------------------------------------------------------------------------


async def test_an_agent_of_a_worker_on_the_database_never_sees_its_password(
    tmp_path: Path,
) -> None:
    """Direct use: the URL's password, the URL file and libpq's variables stay with the worker."""
    import json

    import trio

    from supervisor._worker._config import WorkerConfig
    from supervisor._worker._worker import open_worker
    from supervisor.controlplane._session_client import (
        SESSION_CONTROL_PLANE_ENV,
        SESSION_TOKEN_ENV,
    )

    with private_schema() as url:
        with_password = url.replace("postgresql://postgres@", "postgresql://postgres:hunter2@")
        secret = tmp_path / "db-url"
        secret.write_text(with_password)
        config = WorkerConfig(
            state_dir=tmp_path / "state",
            control_plane=with_password,
            agent=f"{sys.executable} {ROOT / 'tests' / 'agents' / 'report.py'} {{prompt}}",
            api_enabled=False,
            poll_block_ms=100,
        )
        environ = {
            **os.environ,
            "SUPERVISOR_DATABASE_URL_FILE": str(secret),
            "PGPASSWORD": "hunter2",
            "PGPASSFILE": str(secret),
        }
        async with open_worker(config, base_env=environ) as worker:
            work_id = await worker.submit("show me")
            with trio.fail_after(30):
                report = json.loads(str((await worker.wait(work_id)).result))
    env = report["env"]
    assert "hunter2" not in json.dumps(report)
    assert not {"SUPERVISOR_DATABASE_URL_FILE", "PGPASSWORD", "PGPASSFILE"} & set(env)
    assert not {SESSION_CONTROL_PLANE_ENV, SESSION_TOKEN_ENV} & set(env)
