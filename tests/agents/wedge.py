"""Prints the error a wedged agent runtime prints, then hangs without a word."""

import os
import time

print(f"ready pid={os.getpid()} pgid={os.getpgrp()}", flush=True)
print("Error: Control request timeout: initialize", flush=True)
while True:
    time.sleep(3600)
