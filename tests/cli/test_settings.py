"""Layered settings: TOML file < SUPERVISOR_* environment < flags, and errors that name the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from supervisor import ConfigError, WorkerConfig
from supervisor._cli._main import build_parser, load_config


def run_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *flags])


def toml(tmp_path: Path, text: str, name: str = "settings.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(args, environ or {})
    return caught.value


@pytest.mark.parametrize(
    ("in_file", "in_env", "in_flags", "expected"),
    [
        (False, False, False, 4),  # the default
        (True, False, False, 2),
        (True, True, False, 3),
        (True, True, True, 5),
        (False, True, True, 5),
        (True, False, True, 5),
        (False, True, False, 3),
    ],
)
def test_flags_beat_environment_beats_file_beats_default(
    tmp_path: Path, in_file: bool, in_env: bool, in_flags: bool, expected: int
) -> None:
    flags = ["--config", str(toml(tmp_path, "max_concurrency = 2\n"))] if in_file else []
    if in_flags:
        flags += ["--max-concurrency", "5"]
    environ = {"SUPERVISOR_MAX_CONCURRENCY": "3"} if in_env else {}
    assert load_config(run_args(*flags), environ).max_concurrency == expected


def test_each_layer_only_overrides_the_keys_it_names(tmp_path: Path) -> None:
    path = toml(tmp_path, 'max_concurrency = 2\nlease_ttl = 12\nworkspace = "none"\n')
    config = load_config(
        run_args("--config", str(path), "--drain-timeout", "7"),
        {"SUPERVISOR_LEASE_TTL": "9.5"},
    )
    assert (config.max_concurrency, config.lease_ttl, config.drain_timeout) == (2, 9.5, 7.0)


def test_a_worker_table_is_read_like_top_level_keys(tmp_path: Path) -> None:
    path = toml(tmp_path, '[worker]\nmax_concurrency = 6\nlog_format = "json"\n')
    config = load_config(run_args("--config", str(path)), {})
    assert (config.max_concurrency, config.log_format) == (6, "json")


def test_supervisor_config_names_the_file_and_the_flag_beats_it(tmp_path: Path) -> None:
    from_env = toml(tmp_path, "max_concurrency = 2\n", "env.toml")
    from_flag = toml(tmp_path, "max_concurrency = 7\n", "flag.toml")
    environ = {"SUPERVISOR_CONFIG": str(from_env)}
    assert load_config(run_args(), environ).max_concurrency == 2
    assert load_config(run_args("--config", str(from_flag)), environ).max_concurrency == 7


def test_boolean_flags_only_override_when_given(tmp_path: Path) -> None:
    path = toml(tmp_path, "api_enabled = false\nkeep_workspaces = true\n")
    config = load_config(run_args("--config", str(path)), {})
    assert (config.api_enabled, config.keep_workspaces) == (False, True)
    assert load_config(run_args("--no-api"), {}).api_enabled is False
    assert load_config(run_args(), {}).api_enabled is True


def test_repeatable_agent_env_flag_and_comma_separated_variable(tmp_path: Path) -> None:
    assert load_config(run_args("--agent-env", "A", "--agent-env", "B"), {}).agent_env == (
        "A",
        "B",
    )
    assert load_config(run_args(), {"SUPERVISOR_AGENT_ENV": "X, Y"}).agent_env == ("X", "Y")
    path = toml(tmp_path, 'agent_env = "ONLY"\n')
    assert load_config(run_args("--config", str(path)), {}).agent_env == ("ONLY",)


def test_routing_labels_from_flags_environment_and_file_sorted_and_folded(
    tmp_path: Path,
) -> None:
    flags = run_args("--label", "repo:foo", "--label", "gpu", "--label", "gpu")
    assert load_config(flags, {}).labels == ("gpu", "repo:foo")
    assert load_config(run_args(), {"SUPERVISOR_LABELS": "gpu, big-disk"}).labels == (
        "big-disk",
        "gpu",
    )
    path = toml(tmp_path, 'labels = ["repo:foo", "gpu"]\n')
    assert load_config(run_args("--config", str(path)), {}).labels == ("gpu", "repo:foo")
    assert load_config(run_args(), {}).labels == ()
    # The flag replaces the lower layers' labels; it does not add to them.
    both = run_args("--config", str(path), "--label", "cpu")
    assert load_config(both, {"SUPERVISOR_LABELS": "gpu"}).labels == ("cpu",)


@pytest.mark.parametrize(
    "flags",
    [("--label", "has space"), ("--label", ""), ("--label", "x" * 101)],
    ids=["space", "empty", "too-long"],
)
def test_a_bad_worker_label_names_the_labels_setting(flags: tuple[str, ...]) -> None:
    error = config_error(run_args(*flags))
    assert error.key == "labels"
    assert "label" in str(error)


def test_file_variants_read_the_value_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "agent.txt").write_text("my-agent {prompt}\n")
    config = load_config(run_args(), {"SUPERVISOR_AGENT_FILE": str(tmp_path / "agent.txt")})
    assert config.agent == "my-agent {prompt}"


def test_a_toml_agent_list_is_the_commands_arguments_unsplit(tmp_path: Path) -> None:
    """``agent = [...]`` in TOML (as DESIGN §3.4 writes it) is kept argument by argument;
    an agent in a variable or a flag stays a command line, never split on commas."""
    path = toml(tmp_path, 'agent = ["claude", "-p", "{prompt}", "--note", "a, b"]\n')
    config = load_config(run_args("--config", str(path)), {})
    assert config.agent == ("claude", "-p", "{prompt}", "--note", "a, b")
    in_table = toml(tmp_path, '[worker]\nagent = ["prog"]\n', name="table.toml")
    assert load_config(run_args("--config", str(in_table)), {}).agent == ("prog",)
    from_env = load_config(run_args("--config", str(path)), {"SUPERVISOR_AGENT": "x a,b"})
    assert from_env.agent == "x a,b"
    from_flag = load_config(run_args("--config", str(path), "--agent", "y {prompt}"), {})
    assert from_flag.agent == "y {prompt}"


def test_environment_key_file_is_kept_as_a_path_to_reread(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    config = load_config(run_args(), {"SUPERVISOR_ENVIRONMENT_KEY_FILE": str(key_file)})
    assert config.environment_key_file == key_file
    assert config.environment_key is None
    assert "s3cret" not in repr(config)


def test_a_later_layer_choosing_the_key_replaces_an_earlier_key_file(tmp_path: Path) -> None:
    path = toml(tmp_path, f'environment_key_file = "{tmp_path / "key"}"\n')
    config = load_config(
        run_args("--config", str(path)), {"SUPERVISOR_ENVIRONMENT_KEY": "from-the-env"}
    )
    assert (config.environment_key, config.environment_key_file) == ("from-the-env", None)


def test_key_and_key_file_in_one_layer_is_an_error() -> None:
    error = config_error(
        run_args(),
        {"SUPERVISOR_ENVIRONMENT_KEY": "k", "SUPERVISOR_ENVIRONMENT_KEY_FILE": "/some/file"},
    )
    assert error.key == "environment_key_file"


def test_supervisord_variables_are_not_mistaken_for_settings() -> None:
    """supervisord sets these for every program it runs, a worker included."""
    environ = {
        "SUPERVISOR_ENABLED": "1",
        "SUPERVISOR_PROCESS_NAME": "worker",
        "SUPERVISOR_GROUP_NAME": "workers",
        "SUPERVISOR_SERVER_URL": "unix:///tmp/supervisor.sock",
        "SUPERVISOR_WORK_ID": "set-for-agents",
    }
    assert load_config(run_args("--worker-id", "w"), environ) == WorkerConfig(worker_id="w")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max_concurency = 3\n", "max_concurency"),  # a typo is an unknown key
        ("[api]\nport = 1\n", "api"),
        ('max_concurrency = "4"\n', "max_concurrency"),
        ("max_concurrency = 2.5\n", "max_concurrency"),
        ("max_concurrency = 0\n", "max_concurrency"),
        ("state_dir = 5\n", "state_dir"),
        ("agent_env = [1, 2]\n", "agent_env"),
        ("agent = 5\n", "agent"),
        ('agent = ["prog", 1]\n', "agent"),
        ("agent = []\n", "agent"),
        ('agent = ""\n', "agent"),
        ('keep_workspaces = "yes"\n', "keep_workspaces"),
        ("lease_ttl = 0\n", "lease_ttl"),
        ("lease_ttl = true\n", "lease_ttl"),
        ("api_port = 70000\n", "api_port"),
        ("drain_timeout = -1\n", "drain_timeout"),
        ('workspace = "svn"\n', "workspace"),
        ('workspace = "git"\n', "base_repo"),
        ('control_plane = "ftp://x"\n', "control_plane"),
        ('log_format = "xml"\n', "log_format"),
        ("api_host = 1\n", "api_host"),
        ("[worker]\nmax_concurrency = 1\n[other]\nx = 1\n", "other"),
        ("max_concurrency = \n", "config"),  # not TOML at all
    ],
)
def test_bad_file_settings_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    error = config_error(run_args("--config", str(toml(tmp_path, text))))
    assert error.key == key
    assert str(error).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"SUPERVISOR_MAX_CONCURRENCY": "many"}, "SUPERVISOR_MAX_CONCURRENCY"),
        ({"SUPERVISOR_LEASE_TTL": "soon"}, "SUPERVISOR_LEASE_TTL"),
        ({"SUPERVISOR_KEEP_WORKSPACES": "perhaps"}, "SUPERVISOR_KEEP_WORKSPACES"),
        ({"SUPERVISOR_MAX_CONCURRENCY": "-2"}, "max_concurrency"),
        ({"SUPERVISOR_NO_SUCH_THING": "1"}, "SUPERVISOR_NO_SUCH_THING"),
        ({"SUPERVISOR_AGENT_FILE": "/no/such/file"}, "SUPERVISOR_AGENT_FILE"),
    ],
)
def test_bad_environment_settings_name_the_variable_or_key(
    environ: dict[str, str], key: str
) -> None:
    assert config_error(run_args(), environ).key == key


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (("--max-concurrency", "0"), "max_concurrency"),
        (("--api-port", "-1"), "api_port"),
        (("--lease-ttl", "nan"), "lease_ttl"),
        (("--session-timeout", "0"), "session_timeout"),
        (("--control-plane", "localhost:8790"), "control_plane"),
        (("--environment-id", "a/b"), "environment_id"),
        (("--agent-env", "A=B"), "agent_env"),
    ],
)
def test_impossible_flag_values_name_the_key(flags: tuple[str, ...], key: str) -> None:
    assert config_error(run_args(*flags)).key == key


def test_a_missing_config_file_names_the_config_setting(tmp_path: Path) -> None:
    error = config_error(run_args("--config", str(tmp_path / "absent.toml")))
    assert error.key == "config"
    assert "absent.toml" in str(error)


def test_every_worker_setting_can_be_named_in_a_file(tmp_path: Path) -> None:
    """No field is left out of the layering: each round-trips through TOML by its own name."""
    defaults = WorkerConfig(worker_id="w")
    lines = []
    for name in WorkerConfig.field_names():
        value = getattr(defaults, name)
        if value is None or name in ("environment_key",):
            continue
        if isinstance(value, bool):
            lines.append(f"{name} = {str(value).lower()}")
        elif isinstance(value, int | float):
            lines.append(f"{name} = {value!r}")
        elif isinstance(value, tuple):
            lines.append(f"{name} = [{', '.join(repr(v) for v in value)}]")
        else:
            lines.append(f"{name} = {str(value)!r}")
    path = toml(tmp_path, "\n".join(lines) + "\n")
    assert load_config(run_args("--config", str(path)), {}) == defaults


def test_every_run_flag_has_help_text() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 15, (name, action.option_strings)


def test_the_cli_contract_flags_exist() -> None:
    """DESIGN section 5: scripts and operators depend on these names."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    contract = {
        "run": [
            "--config", "--state-dir", "--control-plane", "--environment-id",
            "--max-concurrency", "--agent", "--workspace", "--base-repo", "--api-host",
            "--api-port", "--lease-ttl", "--session-timeout", "--log-format", "--drain-timeout",
        ],
        "submit": ["--state-dir", "--control-plane", "--metadata"],
        "status": ["--json"],
        "cancel": ["--state-dir", "--control-plane"],
        "serve": ["--host", "--port", "--state-dir"],
        "demo": [],
    }  # fmt: skip
    for command, flags in contract.items():
        options = {s for a in sub.choices[command]._actions for s in a.option_strings}
        assert set(flags) <= options, command
