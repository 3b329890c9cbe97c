"""An agent for the lease-bound tests: logs every process it starts, then works a long time.

The prompt is ``MODE LOGFILE [SECONDS]``. Each process of the run appends a JSON line
``{"event": "start", "work_id", "pid", "role", "time"}`` to LOGFILE (and ``"end"`` when
it ends by itself, with ``"code"``), so a checker can tell whether two runs of one item
were ever alive at once. MODE:

* ``plain``: only the agent;
* ``grandchild``: plus a grandchild in the same group that ignores SIGTERM;
* ``setsid``: plus a child that calls ``setsid()`` (leaving the group and session)
  and then double-forks, so that its worker process is orphaned away from the agent.

A run of an item that already ran once (a marker file next to LOGFILE says so) skips
the children and ends after a moment with ``{"result": "second run"}``: the reclaimed
run of a killed worker's item.
"""

import json
import os
import signal
import sys
import time

words = " ".join(sys.argv[1:]).split()
mode, log = words[0], words[1]
seconds = float(words[2]) if len(words) > 2 else 60.0
work_id = os.environ.get("SUPERVISOR_WORK_ID", "?")


def record(event: str, role: str, **extra: object) -> None:
    line = {"event": event, "work_id": work_id, "pid": os.getpid(), "role": role}
    line.update(extra, time=time.time())
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


marker = f"{log}.{work_id}.ran"
second = os.path.exists(marker)
record("start", "agent", second=second)
if second:
    time.sleep(0.2)
    record("end", "agent", code=0)
    print(json.dumps({"result": "second run"}), flush=True)
    sys.exit(0)
with open(marker, "w"):
    pass


def linger(role: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record("start", role)
    while True:
        time.sleep(3600)


if mode == "grandchild" and os.fork() == 0:
    linger("grandchild")
if mode == "setsid" and os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        linger("escaped")
    os._exit(0)
print("working", flush=True)
time.sleep(seconds)
record("end", "agent", code=0)
print(json.dumps({"result": "first run"}), flush=True)
