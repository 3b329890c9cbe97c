"""``open_control_plane``: one location (and key) in, the right open control plane out.

Real parts: the SQLite file on disk, the reference server on 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor import ConfigError, WorkerConfig
from supervisor.controlplane import (
    EmbeddedControlPlane,
    HttpControlPlane,
    SQLiteStore,
    open_control_plane_server,
)
from supervisor.controlplane._connect import open_control_plane, remote_scheme
from supervisor.controlplane._embedded import STORE_FILENAME

KEY = "connect-test-key-0123456789abcdef"


async def test_no_location_is_the_embedded_plane_in_dot_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with open_control_plane(environment_id="env-a") as plane:
        assert isinstance(plane, EmbeddedControlPlane)
        assert plane.environment_id == "env-a"
        await plane.submit("hello")
    assert (tmp_path / ".supervisor" / STORE_FILENAME).is_file()


async def test_a_state_dir_is_created_and_its_store_found_again_by_dir_or_file(
    tmp_path: Path,
) -> None:
    state = tmp_path / "a" / "b"
    async with open_control_plane(state) as plane:
        item = await plane.submit("hello")
    async with open_control_plane(state, create=False) as plane:
        assert (await plane.get(item.id)).data.prompt == "hello"
    async with open_control_plane(str(state / STORE_FILENAME), create=False) as plane:
        assert (await plane.get(item.id)).data.prompt == "hello"


async def test_a_missing_store_is_a_config_error_when_it_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="no control-plane store at") as info:
        async with open_control_plane(missing, create=False, setting="THE_SETTING"):
            pytest.fail("opened a store that is not there")
    assert info.value.key == "THE_SETTING"
    assert not missing.exists()  # nothing created on the way


async def test_an_http_url_opens_the_remote_plane_with_the_key(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "server.sqlite3")
    try:
        async with open_control_plane_server(store, key_provider=KEY) as url:
            async with open_control_plane(url, key=KEY, environment_id="env-b") as plane:
                assert isinstance(plane, HttpControlPlane)
                item = await plane.submit("over http")
            key_file = tmp_path / "key"
            key_file.write_text(KEY + "\n")
            async with open_control_plane(url, key_file=key_file, environment_id="env-b") as plane:
                assert (await plane.get(item.id)).data.prompt == "over http"
    finally:
        store.close()


async def test_a_remote_plane_without_a_key_names_the_callers_settings() -> None:
    with pytest.raises(ConfigError, match="set THE_KEY, please") as info:
        async with open_control_plane("http://127.0.0.1:9", missing_key="set THE_KEY, please"):
            pytest.fail("opened without a key")
    assert info.value.key == "environment_key"


async def test_an_unreadable_key_file_fails_before_any_request(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key"):
        async with open_control_plane("http://127.0.0.1:9", key_file=tmp_path / "absent"):
            pytest.fail("opened with an unreadable key file")


async def test_a_url_of_an_unknown_scheme_is_refused_not_taken_for_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="http://, https://"):
        async with open_control_plane("ftp://host/db", key=KEY):
            pytest.fail("opened an unknown scheme")
    assert list(tmp_path.iterdir()) == []


def test_remote_scheme_is_the_one_list_of_urls_settings_accept() -> None:
    assert remote_scheme("http://h:1") == "http"
    assert remote_scheme("HTTPS://h") == "https"
    assert remote_scheme("/var/lib/supervisor") is None
    assert remote_scheme("ftp://h") is None
    assert WorkerConfig(control_plane="https://h").control_plane == "https://h"
    with pytest.raises(ConfigError) as info:
        WorkerConfig(control_plane="ftp://h")
    assert info.value.key == "control_plane"
