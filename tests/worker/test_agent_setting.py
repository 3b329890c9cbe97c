"""``WorkerConfig(agent=...)`` takes what a Python user naturally writes.

A command's arguments as a list (as DESIGN §3.4 shows), a command line as text,
or an async callable; anything else is a ``ConfigError`` naming ``agent``. The
list and the callable are run for real: a subprocess agent and an in-process one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor import AgentContext, AgentSpec, ConfigError, WorkerConfig, open_worker
from supervisor._worker._config import agent_text
from supervisor.controlplane import EmbeddedControlPlane, OutcomeStatus

AGENTS = Path(__file__).resolve().parents[1] / "agents"


def settings(tmp_path: Path, agent: Any) -> WorkerConfig:
    return WorkerConfig(
        state_dir=tmp_path / "state",
        agent=agent,
        poll_block_ms=50,
        agent_grace=0.5,
        api_enabled=False,
        worker_id="w1",
    )


async def upper(ctx: AgentContext) -> str:
    return ctx.prompt.upper()


async def test_an_argv_list_runs_a_real_subprocess_agent_without_splitting(
    tmp_path: Path,
) -> None:
    """A list is the command's arguments as they are: a prompt with spaces stays one."""
    argv = [sys.executable, str(AGENTS / "ok.py"), "{prompt}"]
    config = settings(tmp_path, argv)
    assert config.agent == tuple(argv)
    async with (
        EmbeddedControlPlane(tmp_path / "cp.sqlite3") as plane,
        open_worker(config, control_plane=plane) as worker,
    ):
        assert worker.agent_spec.argv == tuple(argv)
        outcome = await worker.wait(await worker.submit("two words"))
    assert outcome.status is OutcomeStatus.COMPLETED
    assert outcome.result == "done: two words"


async def test_an_async_callable_in_the_config_runs_in_process(tmp_path: Path) -> None:
    config = settings(tmp_path, upper)
    assert config.agent is upper
    async with (
        EmbeddedControlPlane(tmp_path / "cp.sqlite3") as plane,
        open_worker(config, control_plane=plane) as worker,
    ):
        assert not worker.agent_spec.is_process
        outcome = await worker.wait(await worker.submit("quiet"))
    assert outcome.status is OutcomeStatus.COMPLETED
    assert outcome.result == "QUIET"


def test_each_form_becomes_the_agent_it_names() -> None:
    assert AgentSpec.from_setting("prog -p '{prompt} x'").argv == ("prog", "-p", "{prompt} x")
    assert AgentSpec.from_setting(("prog", "a b")).argv == ("prog", "a b")
    assert AgentSpec.from_setting(upper).function is upper


def test_the_agent_reads_as_a_person_would_write_it() -> None:
    assert agent_text("prog -p {prompt}") == "prog -p {prompt}"
    assert agent_text(("prog", "a b")) == "prog 'a b'"
    assert agent_text(upper).endswith(":upper")


def not_async(ctx: AgentContext) -> str:
    return "sync"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "expected a command"),
        ("   ", "expected a command"),
        ([], "the first argument names the program"),
        ([""], "the first argument names the program"),
        (["prog", 3], "as strings, got 3"),
        (5, "or an async callable, got 5"),
        (None, "or an async callable, got None"),
        ({"cmd": "x"}, "or an async callable"),
        (not_async, "expected an async callable"),
    ],
)
def test_a_wrong_agent_is_a_config_error_naming_the_setting(value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        WorkerConfig(agent=value)
    assert info.value.key == "agent"
