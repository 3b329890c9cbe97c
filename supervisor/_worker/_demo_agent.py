"""The built-in demo agent: ``python -m supervisor._worker._demo_agent PROMPT``.

It does what a real agent does, in miniature and in about a second: prints
progress lines, looks at its workspace, and ends with a JSON line carrying a
``result``. A few words in the prompt make it misbehave on purpose, so the
``demo`` tour (and a curious operator) can watch the supervisor react:

- ``crash``: exits with status 3 halfway through;
- ``hang``: stops printing and never finishes (a timeout or a cancel ends it);
- ``wedge``: prints the runtime's "control request timeout" error, then hangs;
- ``slow``: takes about ten seconds instead of one;
- ``delegate``: hands a sub-task to another agent through the control plane
  (with its session's own credential), waits for the result to arrive in its
  inbox file, and reports the delegate's status (never its output: that is
  another agent's text, read as data only).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

#: What a delegating demo agent asks its delegate to do (no word that misbehaves).
SUBTASK = "double-check the summary"
#: How long a delegating demo agent waits for its delegate's result.
DELEGATE_WAIT = 60.0


def main(argv: list[str]) -> int:
    prompt = " ".join(argv[1:]) or "(empty prompt)"
    words = set(prompt.lower().split())
    steps = 10 if "slow" in words else 3
    pause = 1.0 if "slow" in words else 0.3
    workspace = os.environ.get("SUPERVISOR_WORKSPACE", os.getcwd())
    print(f"demo agent: working on {prompt!r}", flush=True)
    if "delegate" in words:
        return delegate(Path(workspace))
    entries = len(os.listdir(workspace))
    print(f"demo agent: workspace {workspace} holds {entries} entries", flush=True)
    for step in range(1, steps + 1):
        time.sleep(pause)
        print(f"demo agent: step {step}/{steps}", flush=True)
        if step == 2 and "crash" in words:
            print("demo agent: something went badly wrong", file=sys.stderr, flush=True)
            return 3
        if step == 2 and "wedge" in words:
            print("Error: Control request timeout: initialize", flush=True)
            while True:
                time.sleep(3600)
        if step == 2 and "hang" in words:
            while True:
                time.sleep(3600)
    summary = f"{len(prompt.split())} words, {len(prompt)} characters"
    print(json.dumps({"result": f"done: {prompt!r} ({summary})"}), flush=True)
    return 0


def delegate(workspace: Path) -> int:
    """Delegate ``SUBTASK`` and wait for its result in the inbox file."""
    import trio

    from supervisor._worker._inbox import INBOX_FILENAME
    from supervisor.controlplane._session_client import SessionCredentials, open_session_client

    async def ask() -> tuple[str, str]:
        async with open_session_client(SessionCredentials.from_environ()) as client:
            delegation = await client.delegate(SUBTASK)
        return delegation.id, delegation.work_id

    delegation_id, work_id = trio.run(ask)
    print(f"demo agent: delegated {SUBTASK!r}: {delegation_id} (work item {work_id})", flush=True)
    inbox = workspace / INBOX_FILENAME
    deadline = time.monotonic() + DELEGATE_WAIT
    while time.monotonic() < deadline:
        lines = inbox.read_text(encoding="utf-8").splitlines() if inbox.exists() else []
        for line in lines:
            entry = json.loads(line)
            if entry.get("delegation_id") == delegation_id:
                status = entry.get("status")
                print(f"demo agent: delegation {delegation_id} came back {status}", flush=True)
                result = f"done, with help: delegation {delegation_id} {status}"
                print(json.dumps({"result": result}), flush=True)
                return 0
        time.sleep(0.2)
    print("demo agent: the delegate did not answer in time", file=sys.stderr, flush=True)
    return 4


if __name__ == "__main__":
    sys.exit(main(sys.argv))
