"""Delegates the tasks in its prompt, then waits for their results in its inbox.

Prompt ``delegate:TASK1;TASK2`` runs ``python -m supervisor delegate`` once per
task and reports, as its JSON result, the delegation ids it got and every
inbox entry that arrived. Any other prompt makes it a delegate: it answers
``sub-result for <prompt>`` at once.
"""

import json
import os
import subprocess
import sys
import time

prompt = sys.argv[1] if len(sys.argv) > 1 else ""
if not prompt.startswith("delegate:"):
    print(json.dumps({"result": f"sub-result for {prompt}"}), flush=True)
    sys.exit(0)

ids = []
for task in prompt[len("delegate:") :].split(";"):
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "delegate", task],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(f"delegate failed ({done.returncode}): {done.stderr.strip()}", flush=True)
        sys.exit(3)
    ids.append(done.stdout.strip())
    print(f"delegated {ids[-1]}", flush=True)

inbox = os.path.join(os.environ["SUPERVISOR_WORKSPACE"], ".supervisor-inbox.jsonl")
received: dict[str, object] = {}
deadline = time.monotonic() + 60
while len(received) < len(ids) and time.monotonic() < deadline:
    if os.path.exists(inbox):
        with open(inbox, encoding="utf-8") as file:
            for line in file:
                entry = json.loads(line)
                received[entry["delegation_id"]] = entry
    time.sleep(0.05)
print(json.dumps({"result": json.dumps({"delegated": ids, "received": received})}), flush=True)
sys.exit(0 if len(received) == len(ids) else 4)
