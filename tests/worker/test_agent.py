"""Agent specs, the environment policy and the runner for both kinds of agent.

Subprocess agents are real processes (``tests/agents/report.py`` reports its
argv, environment and cwd); in-process agents run under ``autojump_clock``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import trio

from supervisor import AgentContext, AgentSpec, ConfigError, EnvPolicy
from supervisor._worker._agent import DEFAULT_ENV_ALLOWLIST, looks_secret
from supervisor.controlplane import OutcomeStatus
from supervisor.lowlevel import AgentRunner, SessionOutput

REPORT = [sys.executable, str(Path(__file__).resolve().parents[1] / "agents" / "report.py")]
HOSTILE_PROMPT = "$(touch pwned); rm -rf x `touch pwned2` && echo {work_id} > pwned3 | cat"
WORKER_ENV = {
    "PATH": os.environ["PATH"],
    "HOME": "/home/worker",
    "LANG": "C.UTF-8",
    "LC_CTYPE": "C.UTF-8",
    "SUPERVISOR_ENVIRONMENT_KEY": "env-key-do-not-leak",
    "SUPERVISOR_ENVIRONMENT_KEY_FILE": "/run/key",
    "ANTHROPIC_API_KEY": "sk-do-not-leak",
    "ANTHROPIC_BASE_URL": "https://api.example",
    "GITHUB_TOKEN": "ghp-do-not-leak",
    "AWS_SECRET_ACCESS_KEY": "aws-do-not-leak",
    "DATABASE_PASSWORD": "pw-do-not-leak",
    "PYTHONPATH": "/worker/site",
    "RANDOM_SETTING": "1",
}
SECRET_VALUES = [v for k, v in WORKER_ENV.items() if "do-not-leak" in v]


# ---------------------------------------------------------------- parsing specs


def test_parse_splits_a_command_like_a_shell_without_running_one() -> None:
    spec = AgentSpec.parse("claude -p '{prompt}' --output-format json --name \"a b\"")
    assert spec.is_process
    assert spec.argv == ("claude", "-p", "{prompt}", "--output-format", "json", "--name", "a b")
    assert spec.name == "claude"


@pytest.mark.parametrize("text", ["", "   ", "agent 'unbalanced", 'agent "also'])
def test_parse_refuses_empty_or_unbalanced_commands(text: str) -> None:
    with pytest.raises(ConfigError, match="agent"):
        AgentSpec.parse(text)


def test_parse_resolves_module_function_to_an_in_process_agent() -> None:
    spec = AgentSpec.parse("asyncio:sleep")
    assert not spec.is_process
    assert spec.name == "asyncio:sleep"
    import asyncio

    sleep: object = asyncio.sleep
    assert spec.function is sleep


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no_such_module_for_agents:run", "no module named 'no_such_module_for_agents'"),
        ("json:no_such_function", "has no attribute 'no_such_function'"),
        ("json:dumps", "is not an async callable"),
    ],
)
def test_parse_names_the_agent_when_it_cannot_be_resolved(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        AgentSpec.parse(text)
    assert text in str(info.value)
    assert info.value.key == "agent"


def test_a_spec_is_either_a_command_or_an_async_callable() -> None:
    with pytest.raises(ConfigError):
        AgentSpec()
    with pytest.raises(ConfigError, match="not an async callable"):
        AgentSpec.from_callable(print)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="empty"):
        AgentSpec.from_argv([])
    with pytest.raises(ConfigError, match="sequence"):
        AgentSpec(argv="claude -p")


def test_from_callable_accepts_objects_with_an_async_call() -> None:
    class Agent:
        async def __call__(self, ctx: AgentContext) -> str:
            return "ok"

    assert not AgentSpec.from_callable(Agent()).is_process


def test_render_substitutes_literally_and_in_one_pass() -> None:
    spec = AgentSpec.from_argv(["run", "--p={prompt}", "{work_id}/{session_id}", "{other} {0}"])
    argv = spec.render_argv(prompt="{work_id} {0} %s", work_id="w1", session_id="s1")
    assert argv == ["run", "--p={work_id} {0} %s", "w1/s1", "{other} {0}"]


def test_a_hostile_prompt_stays_one_argument() -> None:
    spec = AgentSpec.parse("agent -p {prompt} --id {work_id}")
    argv = spec.render_argv(prompt=HOSTILE_PROMPT, work_id="w", session_id="s")
    assert argv == ["agent", "-p", HOSTILE_PROMPT, "--id", "w"]


# ---------------------------------------------------------------- environment policy


def test_secret_looking_names() -> None:
    for name in ("GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "OPENAI_APIKEY", "DB_PASSWORD", "AUTH"):
        assert looks_secret(name), name
    for name in ("PATH", "KEYBOARD_LAYOUT", "LANG", "TOKENIZERS_PARALLELISM"):
        assert not looks_secret(name), name


def test_default_policy_passes_only_the_allowlist() -> None:
    policy = EnvPolicy()
    env = policy.build(WORKER_ENV, work_id="w", session_id="s", workspace=Path("/ws"))
    assert env == {
        "PATH": os.environ["PATH"],
        "HOME": "/home/worker",
        "LANG": "C.UTF-8",
        "LC_CTYPE": "C.UTF-8",
        "SUPERVISOR_WORK_ID": "w",
        "SUPERVISOR_SESSION_ID": "s",
        "SUPERVISOR_WORKSPACE": "/ws",
    }
    assert "PYTHONPATH" not in DEFAULT_ENV_ALLOWLIST


def test_patterns_never_pass_secrets_but_exact_names_do() -> None:
    policy = EnvPolicy(extra={"ANTHROPIC_*", "SUPERVISOR_*", "GITHUB_TOKEN"})
    env = policy.build(WORKER_ENV, work_id="w", session_id="s", workspace=Path("/ws"))
    assert env["ANTHROPIC_BASE_URL"] == "https://api.example"
    assert env["GITHUB_TOKEN"] == WORKER_ENV["GITHUB_TOKEN"]
    assert "ANTHROPIC_API_KEY" not in env
    assert "SUPERVISOR_ENVIRONMENT_KEY" not in env
    assert "SUPERVISOR_ENVIRONMENT_KEY_FILE" not in env


def test_the_environment_key_passes_only_when_named_exactly() -> None:
    policy = EnvPolicy(extra="SUPERVISOR_ENVIRONMENT_KEY")
    env = policy.build(WORKER_ENV, work_id="w", session_id="s", workspace=Path("/ws"))
    assert env["SUPERVISOR_ENVIRONMENT_KEY"] == "env-key-do-not-leak"


def test_session_variables_are_added_but_cannot_override_supervisor_ids() -> None:
    env = EnvPolicy().build(
        WORKER_ENV,
        work_id="w",
        session_id="s",
        workspace=Path("/ws"),
        session_env={"SESSION_CREDENTIAL": "cred", "SUPERVISOR_WORK_ID": "forged"},
    )
    assert env["SESSION_CREDENTIAL"] == "cred"
    assert env["SUPERVISOR_WORK_ID"] == "w"


def test_bad_session_variables_are_refused_without_echoing_the_value() -> None:
    def build(session_env: dict[str, str]) -> None:
        EnvPolicy().build(
            {}, work_id="w", session_id="s", workspace=Path("/"), session_env=session_env
        )

    with pytest.raises(ValueError, match="'X'") as info:
        build({"X": "secret\x00value"})
    assert "secret" not in str(info.value)
    with pytest.raises(ValueError, match="name"):
        build({"A=B": "v"})


def test_policy_names_are_validated() -> None:
    with pytest.raises(ConfigError, match="agent_env"):
        EnvPolicy(extra={"BAD=NAME"})


# ---------------------------------------------------------------- subprocess agents


async def test_a_process_agent_gets_verbatim_argv_and_only_the_allowed_environment(
    tmp_path: Path,
) -> None:
    runner = AgentRunner(
        AgentSpec.from_argv([*REPORT, "{prompt}", "--work={work_id}", "{session_id}"]),
        env_policy=EnvPolicy(extra={"ANTHROPIC_*"}),
        base_env=WORKER_ENV,
    )
    output = SessionOutput(log_path=tmp_path / "logs" / "s.log")
    result = await runner.run(
        prompt=HOSTILE_PROMPT,
        work_id="item 1",
        session_id="sess;1",
        workspace=tmp_path,
        output=output,
        session_env={"SESSION_CREDENTIAL": "per-session-do-not-log"},
    )
    assert result.status is OutcomeStatus.COMPLETED
    report = json.loads(result.result)
    assert report["argv"] == [HOSTILE_PROMPT, "--work=item 1", "sess;1"]
    assert report["cwd"] == str(tmp_path)
    assert list(tmp_path.glob("pwned*")) == []
    env = report["env"]
    env.pop("LC_CTYPE", None)  # some interpreters set it on start-up
    assert env == {
        "PATH": WORKER_ENV["PATH"],
        "HOME": "/home/worker",
        "LANG": "C.UTF-8",
        "ANTHROPIC_BASE_URL": "https://api.example",
        "SESSION_CREDENTIAL": "per-session-do-not-log",
        "SUPERVISOR_WORK_ID": "item 1",
        "SUPERVISOR_SESSION_ID": "sess;1",
        "SUPERVISOR_WORKSPACE": str(tmp_path),
    }
    assert "do-not-leak" not in result.result
    assert "do-not-leak" not in repr(runner)
    log = (tmp_path / "logs" / "s.log").read_text()
    # The agent printed its own environment (that is its business), but the
    # runner itself never wrote a variable to the log.
    runner_notes = [line for line in log.splitlines() if line.startswith("[supervisor]")]
    assert runner_notes
    assert not any("do-not" in line for line in runner_notes)


async def test_runner_defaults_to_the_worker_environment(tmp_path: Path) -> None:
    runner = AgentRunner(AgentSpec.from_argv(REPORT))
    result = await runner.run(prompt="p", work_id="w", session_id="s", workspace=tmp_path)
    env = json.loads(result.result)["env"]
    assert env["PATH"] == os.environ["PATH"]
    assert env["SUPERVISOR_SESSION_ID"] == "s"


# ---------------------------------------------------------------- in-process agents


async def test_an_in_process_agent_gets_its_context_and_its_output_is_streamed(
    tmp_path: Path,
) -> None:
    seen: list[AgentContext] = []

    async def agent(ctx: AgentContext) -> str:
        seen.append(ctx)
        ctx.emit("working on it")
        ctx.emit("two\nlines")
        await trio.sleep(1)
        return f"answer to {ctx.prompt}"

    lines: list[str] = []
    output = SessionOutput(log_path=tmp_path / "s.log", on_line=lines.append)
    runner = AgentRunner(AgentSpec.from_callable(agent), base_env=WORKER_ENV)
    result = await runner.run(
        prompt="q",
        work_id="w",
        session_id="s",
        workspace=tmp_path,
        output=output,
        session_env={"SESSION_CREDENTIAL": "cred-do-not-log"},
    )
    assert result.status is OutcomeStatus.COMPLETED
    assert result.result == "answer to q"
    assert result.exit_code is None
    assert lines == ["working on it", "two", "lines"]
    assert result.tail == ("working on it", "two", "lines")
    ctx = seen[0]
    assert (ctx.prompt, ctx.work_id, ctx.session_id, ctx.workspace) == ("q", "w", "s", tmp_path)
    assert ctx.env["SUPERVISOR_WORKSPACE"] == str(tmp_path)
    assert ctx.env["SESSION_CREDENTIAL"] == "cred-do-not-log"
    assert "ANTHROPIC_API_KEY" not in ctx.env
    assert "do-not" not in repr(ctx)
    with pytest.raises(TypeError):
        ctx.env["X"] = "y"  # type: ignore[index]
    log = (tmp_path / "s.log").read_text()
    assert log.startswith("working on it\ntwo\nlines\n")
    assert "do-not" not in log


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"files": ["a.py"], "ok": True}, '{"files": ["a.py"], "ok": true}'),
        ([1, 2], "[1, 2]"),
        (42, "42"),
    ],
)
async def test_in_process_results_that_are_not_strings_become_json(
    tmp_path: Path, value: object, expected: str
) -> None:
    async def agent(ctx: AgentContext) -> object:
        return value

    result = await AgentRunner(AgentSpec.from_callable(agent)).run(
        prompt="p", work_id="w", session_id="s", workspace=tmp_path
    )
    assert result.result == expected


async def test_an_in_process_agent_returning_none_reports_its_output(tmp_path: Path) -> None:
    async def agent(ctx: AgentContext) -> None:
        ctx.emit("progress")
        ctx.emit(json.dumps({"result": "from a line"}))

    result = await AgentRunner(AgentSpec.from_callable(agent)).run(
        prompt="p", work_id="w", session_id="s", workspace=tmp_path
    )
    assert result.result == "from a line"


async def test_an_in_process_exception_fails_with_its_message_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def agent(ctx: AgentContext) -> str:
        raise ValueError("the model refused")

    caplog.set_level("DEBUG", logger="supervisor.agent")
    output = SessionOutput(log_path=tmp_path / "s.log")
    result = await AgentRunner(AgentSpec.from_callable(agent, name="refuser")).run(
        prompt="p", work_id="w", session_id="s", workspace=tmp_path, output=output
    )
    assert result.status is OutcomeStatus.FAILED
    assert result.result == "the model refused"
    assert result.reason == "agent raised ValueError: the model refused"
    assert "Traceback" not in result.result
    record = next(r for r in caplog.records if "refuser" in r.getMessage())
    assert record.levelname == "DEBUG"
    assert record.exc_info is not None
    assert "[supervisor] agent raised ValueError" in (tmp_path / "s.log").read_text()


async def test_cancelling_an_in_process_agent_propagates(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cancelled_inside = False

    async def agent(ctx: AgentContext) -> str:
        nonlocal cancelled_inside
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled_inside = True
            raise

    runner = AgentRunner(AgentSpec.from_callable(agent))
    with trio.move_on_after(5) as scope:
        await runner.run(prompt="p", work_id="w", session_id="s", workspace=tmp_path)
        pytest.fail("the run returned instead of being cancelled")
    assert scope.cancelled_caught
    assert cancelled_inside


async def test_session_timeout_stops_an_in_process_agent_at_the_limit(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def agent(ctx: AgentContext) -> str:
        ctx.emit("thinking")
        await trio.sleep(1000)
        return "late"

    runner = AgentRunner(AgentSpec.from_callable(agent), session_timeout=30)
    result = await runner.run(prompt="p", work_id="w", session_id="s", workspace=tmp_path)
    assert result.timed_out
    assert result.status is OutcomeStatus.TIMEOUT
    assert result.duration == 30
    assert result.result == "thinking"


async def test_session_timeout_counts_execution_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Time spent before the run (waiting for a slot, preparing a workspace) is not counted."""

    async def agent(ctx: AgentContext) -> str:
        await trio.sleep(25)
        return "in time"

    runner = AgentRunner(AgentSpec.from_callable(agent), session_timeout=30)
    await trio.sleep(100)  # a long wait for a free slot
    result = await runner.run(prompt="p", work_id="w", session_id="s", workspace=tmp_path)
    assert not result.timed_out
    assert result.result == "in time"
    assert result.duration == 25


async def test_an_on_line_error_propagates_from_an_in_process_run(tmp_path: Path) -> None:
    async def agent(ctx: AgentContext) -> str:
        ctx.emit("boom")
        return "unreachable"

    def watcher(line: str) -> None:
        raise RuntimeError(f"watcher saw {line}")

    runner = AgentRunner(AgentSpec.from_callable(agent))
    with pytest.raises(RuntimeError, match="watcher saw boom"):
        await runner.run(
            prompt="p",
            work_id="w",
            session_id="s",
            workspace=tmp_path,
            output=SessionOutput(on_line=watcher),
        )


def test_runner_settings_are_validated() -> None:
    spec = AgentSpec.from_argv(["true"])
    with pytest.raises(ConfigError, match="session_timeout"):
        AgentRunner(spec, session_timeout=0)
    with pytest.raises(ValueError, match="grace"):
        AgentRunner(spec, grace=-1)


@pytest.mark.parametrize(
    ("exit_code", "status", "reason"),
    [
        (0, OutcomeStatus.COMPLETED, None),
        (3, OutcomeStatus.FAILED, "exit code 3"),
        (-15, OutcomeStatus.FAILED, "killed by SIGTERM"),
    ],
)
async def test_exit_codes_map_to_outcomes(
    tmp_path: Path, exit_code: int, status: OutcomeStatus, reason: str | None
) -> None:
    code = f"import os, signal; os.kill(os.getpid(), {-exit_code})" if exit_code < 0 else ""
    code = code or f"raise SystemExit({exit_code})"
    runner = AgentRunner(AgentSpec.from_argv([sys.executable, "-c", code]))
    result = await runner.run(prompt="p", work_id="w", session_id="s", workspace=tmp_path)
    outcome = result.to_outcome()
    assert (outcome.status, outcome.exit_code, outcome.reason) == (status, exit_code, reason)


def test_the_admitted_environment_follows_changes_to_os_environ(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The filtered environment is cached between sessions, never past a change."""
    policy = EnvPolicy(extra=frozenset({"SUPERVISOR_TEST_EXTRA"}))

    def build() -> dict[str, str]:
        return policy.build(os.environ, work_id="w", session_id="s", workspace=tmp_path)

    monkeypatch.delenv("SUPERVISOR_TEST_EXTRA", raising=False)
    assert "SUPERVISOR_TEST_EXTRA" not in build()
    monkeypatch.setenv("SUPERVISOR_TEST_EXTRA", "one")
    assert build()["SUPERVISOR_TEST_EXTRA"] == "one"
    monkeypatch.setenv("SUPERVISOR_TEST_EXTRA", "two")  # same names, another value
    assert build()["SUPERVISOR_TEST_EXTRA"] == "two"
    monkeypatch.delenv("SUPERVISOR_TEST_EXTRA")
    assert "SUPERVISOR_TEST_EXTRA" not in build()
