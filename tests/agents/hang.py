"""Says it is ready, then sleeps until killed (default SIGTERM handling)."""

import os
import time

print(f"ready pid={os.getpid()} pgid={os.getpgrp()}", flush=True)
while True:
    time.sleep(3600)
