"""Traps SIGTERM, reports it, and keeps running: only SIGKILL stops it."""

import os
import signal
import time


def on_term(signum: int, frame: object) -> None:
    # os.write, not print: the signal may arrive while print() holds stdout's buffer.
    os.write(1, b"got SIGTERM, ignoring it\n")


signal.signal(signal.SIGTERM, on_term)
print(f"ready pid={os.getpid()} pgid={os.getpgrp()}", flush=True)
while True:
    time.sleep(3600)
