"""The environment policies from the command line: backpressure, retention, default retries.

``submit`` on a full queue prints one line and exits 1 (embedded and served);
``serve`` and ``run`` take the policies as flags and write them to the store;
bad values are refused with exit 2 before anything starts.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cli.test_cli import KEY, cli, cli_env, running, running_worker, status_json, submit

from supervisor.controlplane import EnvironmentSettings, SQLiteStore
from supervisor.controlplane._embedded import STORE_FILENAME

pytestmark = pytest.mark.slow

FULL_LINE = (
    "python -m supervisor: queue full: environment default holds 1 queued items "
    "(max_queue_depth 1); retry in 5 s\n"
)


def settings_of(state_dir: Path, environment_id: str = "default") -> EnvironmentSettings:
    store = SQLiteStore(state_dir / STORE_FILENAME)
    try:
        return store.environment_settings(environment_id, now=time.time())
    finally:
        store.close()


async def test_submit_on_a_full_embedded_queue_prints_one_line_and_exits_1(
    tmp_path: Path,
) -> None:
    first = await submit(tmp_path, "fills the queue")
    store = SQLiteStore(tmp_path / ".supervisor" / STORE_FILENAME)
    try:
        store.configure_environment("default", {"max_queue_depth": 1}, now=time.time())
    finally:
        store.close()
    done = await cli("submit", "one too many", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == FULL_LINE
    # A key already used still answers its item, full queue or not.
    keyed = await cli("submit", "again", "--key", "k", cwd=tmp_path)
    assert keyed.returncode == 1 and keyed.stderr == FULL_LINE
    assert [i["id"] for i in (await status_json(tmp_path))["items"]] == [first]


async def test_serve_applies_its_policy_flags_and_a_full_queue_is_429_for_submit(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    env = cli_env(SUPERVISOR_ENVIRONMENT_KEY_FILE=str(key_file))
    server_dir = tmp_path / "cp"
    server_dir.mkdir()
    flags = (
        "--max-queue-depth", "1", "--retention", "7d", "--max-attempts", "4",
        "--backoff", "2", "--backoff-max", "30",
    )  # fmt: skip
    async with running(
        server_dir, "serve", "--port", "0", "--state-dir", str(server_dir), *flags,
        marker="\n", env=env,
    ) as server:  # fmt: skip
        url = server.first_output.strip()
        target = ("--control-plane", url)
        item_id = await submit(tmp_path, "fills the queue", *target, env=env)
        done = await cli("submit", "one too many", *target, cwd=tmp_path, env=env)
        assert done.returncode == 1
        assert done.stderr == FULL_LINE
        items = (await status_json(tmp_path, *target, env=env))["items"]
        assert [i["id"] for i in items] == [item_id]
        # The environment default retry policy reached the item submitted without one.
        assert items[0]["retry"]["max_attempts"] == 4
        # An environment created later through this server gets the flags too.
        other = ("--environment-id", "later")
        await submit(tmp_path, "first in its environment", *target, *other, env=env)
        done = await cli("submit", "second", *target, *other, cwd=tmp_path, env=env)
        assert done.returncode == 1 and "environment later holds 1" in done.stderr
    settings = settings_of(server_dir)
    assert settings == EnvironmentSettings(
        max_queue_depth=1, retention=7 * 86_400.0, max_attempts=4, backoff=2.0, backoff_max=30.0
    )


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--max-queue-depth", "0"), "--max-queue-depth"),
        (("--retention", "soon"), "--retention"),
        (("--retention", "0s"), "--retention"),
        (("--max-attempts", "101"), "--max-attempts"),
        (("--backoff", "-1"), "--backoff"),
        (("--backoff-max", "inf"), "--backoff-max"),
    ],
)
async def test_serve_refuses_a_bad_policy_flag_with_exit_2(
    tmp_path: Path, flags: tuple[str, ...], needle: str
) -> None:
    env = cli_env(SUPERVISOR_ENVIRONMENT_KEY=KEY)
    done = await cli("serve", "--port", "0", "--state-dir", str(tmp_path), *flags, cwd=tmp_path,
                     env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / STORE_FILENAME).exists()


async def test_run_writes_its_policy_flags_to_the_embedded_store(tmp_path: Path) -> None:
    async with running_worker(
        tmp_path, "--max-queue-depth", "3", "--retention", "12h", "--max-attempts", "2",
        "--no-api",
    ):  # fmt: skip
        pass
    settings = settings_of(tmp_path / ".supervisor")
    assert settings == EnvironmentSettings(max_queue_depth=3, retention=43_200.0, max_attempts=2)


@pytest.mark.parametrize(
    ("args", "environ", "needle"),
    [
        (["run", "--max-queue-depth", "0"], {}, "max_queue_depth"),
        (["run", "--retention", "forever"], {}, "--retention"),
        (["run"], {"SUPERVISOR_RETENTION": "forever"}, "retention"),
        (["run"], {"SUPERVISOR_DEFAULT_BACKOFF": "-3"}, "default_backoff"),
        (
            ["run", "--control-plane", "http://127.0.0.1:9", "--max-queue-depth", "5"],
            {"SUPERVISOR_ENVIRONMENT_KEY": KEY},
            "set them with 'serve'",
        ),
    ],
)
async def test_run_refuses_bad_policies_with_exit_2(
    tmp_path: Path, args: list[str], environ: dict[str, str], needle: str
) -> None:
    done = await cli(*args, cwd=tmp_path, env=cli_env(**environ))
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / ".supervisor").exists()
