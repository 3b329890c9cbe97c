"""Handles SIGTERM promptly: prints a line and exits 0 from the handler."""

import os
import signal
import time


def on_term(signum: int, frame: object) -> None:
    # os.write, not print: the signal may arrive while print() holds stdout's buffer.
    os.write(1, b"terminating\n")
    os._exit(0)


signal.signal(signal.SIGTERM, on_term)
print(f"ready pid={os.getpid()} pgid={os.getpgrp()}", flush=True)
while True:
    time.sleep(3600)
