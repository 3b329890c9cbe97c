"""Log output: text or JSON lines, and secrets that never reach either."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from recording_plane import RecordingPlane

from supervisor import AgentContext, WorkerConfig, open_worker
from supervisor._base._logging import RedactSecrets, configure_logging, redact_secret

KEY = "environment-key-0123456789"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging changes the process-wide 'supervisor' logger: put it back."""
    import supervisor._base._logging as module

    root = logging.getLogger("supervisor")
    saved = (list(root.handlers), root.level, root.propagate, module._installed)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]
    module._installed = saved[3]


def test_text_lines_are_readable_and_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("text", secrets=[KEY])
    logging.getLogger("supervisor.test").warning("calling with %s and %r", KEY, {"k": KEY})
    err = capsys.readouterr().err
    assert KEY not in err
    assert "WARNING supervisor.test: calling with *** and {'k': '***'}" in err


def test_json_lines_parse_and_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", secrets=[KEY])
    log = logging.getLogger("supervisor.test")
    log.info("first %s", KEY)
    try:
        raise ValueError(f"boom {KEY}")
    except ValueError:
        log.exception("second")
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["message"] for r in records] == ["first ***", "second"]
    assert records[0]["level"] == "info" and records[0]["logger"] == "supervisor.test"
    assert records[0]["time"].endswith("Z")
    assert "exception" in records[1]


def test_short_strings_are_never_treated_as_secrets() -> None:
    """Redacting 'a' would mangle every message; a secret has some length."""
    redact = RedactSecrets(["a", ""])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a cat", None, None)
    redact.filter(record)
    assert record.getMessage() == "a cat"


def test_redact_secret_until_forgotten(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("text")
    log = logging.getLogger("supervisor.test")
    forget = redact_secret("session-secret-abc")
    log.warning("one session-secret-abc")
    forget()
    log.warning("two session-secret-abc")
    err = capsys.readouterr().err
    assert "one ***" in err
    assert "two session-secret-abc" in err  # forgotten: the filter does not grow forever


def test_redact_secret_without_configured_logging_does_nothing() -> None:
    import supervisor._base._logging as module

    module._installed = None
    redact_secret("whatever-secret")()  # no error, no filter touched


async def test_a_session_credential_is_redacted_while_its_session_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    filter_ = configure_logging("text")
    plane = RecordingPlane(tmp_path / "cp.sqlite3")
    plane.secrets = []
    log = logging.getLogger("supervisor.test")

    async def careless_agent(ctx: AgentContext) -> str:
        # Something in the session logs the credential by mistake.
        log.warning("oops %s", plane.secrets[-1])
        return "done"

    config = WorkerConfig(
        state_dir=tmp_path / "state", api_enabled=False, poll_block_ms=50, worker_id="w"
    )
    try:
        async with open_worker(config, control_plane=plane, agent=careless_agent) as worker:
            await worker.wait(await worker.submit("x"))
            with trio.fail_after(5):
                while worker.stats().active:
                    await trio.sleep(0.01)
    finally:
        await plane.aclose()
    (secret,) = plane.secrets
    err = capsys.readouterr().err
    assert "oops ***" in err
    assert secret not in err
    assert secret not in filter_._secrets  # forgotten once the session ended
