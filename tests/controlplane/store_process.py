"""A separate process that submits into, or claims from, one control-plane SQLite file.

Used by ``test_store_processes.py``; run as::

    python store_process.py submit DB PREFIX COUNT
    python store_process.py claim DB WORKER DONE_FILE

``submit`` prints each new item's id. ``claim`` polls and acks until the
``DONE_FILE`` exists and the queue is empty, printing each claimed id; it
exits 3 if that takes longer than a minute, so a broken store cannot hang the
test.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from supervisor.controlplane import SQLiteStore

ENV = "default"


def submit(db: str, prefix: str, count: int) -> int:
    store = SQLiteStore(db)
    try:
        for n in range(count):
            item = store.submit(ENV, f"{prefix} {n}", now=time.time(), metadata={"from": prefix})
            print(item.id, flush=True)
    finally:
        store.close()
    return 0


def claim(db: str, worker: str, done_file: str) -> int:
    store = SQLiteStore(db)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            submitters_done = Path(done_file).exists()
            item = store.poll(ENV, worker_id=worker, now=time.time())
            if item is None:
                if submitters_done:
                    return 0
                time.sleep(0.002)
                continue
            store.ack(ENV, item.id, worker_id=worker, now=time.time())
            print(item.id, flush=True)
    finally:
        store.close()
    return 3


def main(argv: list[str]) -> int:
    if argv[:1] == ["submit"] and len(argv) == 4:
        return submit(argv[1], argv[2], int(argv[3]))
    if argv[:1] == ["claim"] and len(argv) == 4:
        return claim(argv[1], argv[2], argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
