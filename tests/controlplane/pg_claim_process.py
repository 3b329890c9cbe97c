"""A separate process that claims from one PostgreSQL control plane until the queue is empty.

Used by ``test_postgres_store.py``; run as::

    python pg_claim_process.py URL WORKER GO_FILE

It opens its store, prints ``ready``, waits for ``GO_FILE`` to exist (so every
claimer starts at once), then polls and acks until a poll finds nothing,
printing each claimed id. It exits 3 after a minute, so a broken store cannot
hang the test.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from supervisor.controlplane._store._postgres import PostgresStore

ENV = "default"


def main(url: str, worker: str, go_file: str) -> int:
    store = PostgresStore(url, pool_size=1)
    deadline = time.monotonic() + 60
    try:
        print("ready", flush=True)
        while not Path(go_file).exists():
            if time.monotonic() > deadline:
                return 3
            time.sleep(0.005)
        while time.monotonic() < deadline:
            item = store.poll(ENV, worker_id=worker, now=time.time())
            if item is None:
                return 0
            store.ack(ENV, item.id, worker_id=worker, now=time.time())
            print(item.id, flush=True)
    finally:
        store.close()
    return 3


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
