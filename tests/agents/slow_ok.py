"""Sleeps SECONDS (default 0.2), then succeeds with a JSON result."""

import json
import sys
import time

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 0.2
print("started", flush=True)
time.sleep(seconds)
print(json.dumps({"result": f"slept {seconds}"}), flush=True)
