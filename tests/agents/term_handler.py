"""Handles SIGTERM promptly: prints a line and exits 0 from the handler."""

import os
import signal
import sys
import time


def on_term(signum: int, frame: object) -> None:
    sys.stdout.write("terminating\n")
    sys.stdout.flush()
    os._exit(0)


signal.signal(signal.SIGTERM, on_term)
print(f"ready pid={os.getpid()} pgid={os.getpgrp()}", flush=True)
while True:
    time.sleep(3600)
