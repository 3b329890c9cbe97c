"""A plain, thread-based script that runs agent sessions through ``ThreadedWorker``.

    python examples/threaded_script.py [STATE_DIR]

No Trio in sight: ``start()`` returns once the worker is ready, ``submit()``
returns a handle at once, ``handle.result()`` waits for the outcome, and
``stop()`` shuts everything down (pending handles would raise ``WorkCancelled``).
"""

from __future__ import annotations

import sys
import tempfile

from supervisor import ThreadedWorker, WorkerConfig


def main() -> int:
    state_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="threaded-")
    config = WorkerConfig(state_dir=state_dir, max_concurrency=3, api_enabled=False)
    with ThreadedWorker(config) as worker:
        handles = [worker.submit(f"summarise chapter {n}") for n in range(1, 4)]
        for handle in handles:
            outcome = handle.result(timeout=60)
            print(f"{handle.item_id}: {outcome.status.value}: {outcome.result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
