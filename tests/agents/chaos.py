"""Chaos-run agent: logs its start and end, works SECONDS, exits with CODE.

The prompt (one argument, or several) is "SECONDS CODE LOGFILE". Each line
appended to LOGFILE is a JSON object {"event": "start"|"end", "work_id", "pid",
"time", ...}, so a checker can tell whether two agents ever served one work
item at the same time. SIGTERM ends it at once, logged as an end.
"""

import json
import os
import signal
import sys
import time

words = " ".join(sys.argv[1:]).split()
seconds, code, log = float(words[0]), int(words[1]), words[2]
poison = words[3:4] == ["poison"]  # the result holds a lone surrogate escape
work_id = os.environ.get("SUPERVISOR_WORK_ID", "?")


def record(event: str, **extra: object) -> None:
    line = {"event": event, "work_id": work_id, "pid": os.getpid(), "time": time.time()}
    line.update(extra)
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def on_term(signum: int, frame: object) -> None:
    record("end", signal="SIGTERM")
    os._exit(143)


signal.signal(signal.SIGTERM, on_term)
record("start")
print(f"working for {seconds}s", flush=True)
time.sleep(seconds)
record("end", code=code)
if code == 0:
    result = f"slept {seconds}" + (" \\ud800" if poison else "")
    print(f'{{"result": "{result}"}}', flush=True)  # raw JSON text: the escape is kept
sys.exit(code)
