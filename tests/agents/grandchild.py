"""Spawns a grandchild (same process group) that ignores SIGTERM and runs forever.

``grandchild.py wait``: the parent stays alive too. ``grandchild.py exit``: the parent
exits 0 at once, leaving the grandchild behind (still holding stdout).
"""

import os
import subprocess
import sys

GRANDCHILD = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "while True:\n"
    "    time.sleep(3600)\n"
)

mode = sys.argv[1] if len(sys.argv) > 1 else "wait"
child = subprocess.Popen([sys.executable, "-c", GRANDCHILD])
print(f"ready pid={os.getpid()} pgid={os.getpgrp()} grandchild={child.pid}", flush=True)
if mode == "exit":
    os._exit(0)
child.wait()
