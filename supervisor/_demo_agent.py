"""The built-in demo agent: ``python -m supervisor._demo_agent PROMPT``.

It does what a real agent does, in miniature and in about a second: prints
progress lines, looks at its workspace, and ends with a JSON line carrying a
``result``. A few words in the prompt make it misbehave on purpose, so the
``demo`` tour (and a curious operator) can watch the supervisor react:

- ``crash``: exits with status 3 halfway through;
- ``hang``: stops printing and never finishes (a timeout or a cancel ends it);
- ``wedge``: prints the runtime's "control request timeout" error, then hangs;
- ``slow``: takes about ten seconds instead of one.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    prompt = " ".join(argv[1:]) or "(empty prompt)"
    words = set(prompt.lower().split())
    steps = 10 if "slow" in words else 3
    pause = 1.0 if "slow" in words else 0.3
    workspace = os.environ.get("SUPERVISOR_WORKSPACE", os.getcwd())
    print(f"demo agent: working on {prompt!r}", flush=True)
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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
