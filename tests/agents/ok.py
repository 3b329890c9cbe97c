"""Prints a few progress lines, then a JSON result line, and exits 0."""

import json
import os
import sys

prompt = sys.argv[1] if len(sys.argv) > 1 else ""
print(f"pid={os.getpid()} pgid={os.getpgrp()}", flush=True)
for step in range(1, 4):
    print(f"step {step}/3", flush=True)
print(json.dumps({"type": "progress", "note": "no result field here"}), flush=True)
print(json.dumps({"type": "result", "result": f"done: {prompt}"}), flush=True)
print("bye", flush=True)
