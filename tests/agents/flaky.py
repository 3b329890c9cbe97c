"""Fails (exit 1) its first N runs, then succeeds: ``flaky.py COUNTER_FILE N``.

The counter file outlives each run (it is outside the workspace), so the
runs of one item, on any worker, see how many came before them.
"""

import json
import sys
import time
from pathlib import Path

counter, failures = Path(sys.argv[1]), int(sys.argv[2])
runs = json.loads(counter.read_text()) if counter.exists() else []
runs.append(time.time())
counter.write_text(json.dumps(runs))
if len(runs) <= failures:
    print(f"run {len(runs)} fails", file=sys.stderr, flush=True)
    sys.exit(1)
print(json.dumps({"type": "result", "result": f"succeeded on run {len(runs)}"}), flush=True)
