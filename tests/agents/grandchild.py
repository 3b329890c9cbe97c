"""Spawns a grandchild (same process group) that ignores SIGTERM and runs forever.

``grandchild.py wait``: the parent stays alive too. ``grandchild.py exit``: the parent
exits 0 at once, leaving the grandchild behind (still holding stdout). Either way
"ready" is printed only once the grandchild ignores SIGTERM.
"""

import os
import subprocess
import sys

GRANDCHILD = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "fd = int(sys.argv[1])\n"
    "os.write(fd, b'x')\n"
    "os.close(fd)\n"
    "while True:\n"
    "    time.sleep(3600)\n"
)

mode = sys.argv[1] if len(sys.argv) > 1 else "wait"
read_end, write_end = os.pipe()
child = subprocess.Popen([sys.executable, "-c", GRANDCHILD, str(write_end)], pass_fds=(write_end,))
os.close(write_end)
os.read(read_end, 1)
print(f"ready pid={os.getpid()} pgid={os.getpgrp()} grandchild={child.pid}", flush=True)
if mode == "exit":
    os._exit(0)
child.wait()
