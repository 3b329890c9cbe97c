"""The control-plane store: the lifecycle written once, two engines underneath.

* `_common`: policies, input checks, rows to records;
* `_sql`: the seam to a database (a transaction and a dialect);
* `_core`: transactions, lease expiry, the fencing check and wake-ups, shared by
  every record kind;
* `_items`, `_workers`, `_delegations`: the contract, one module per record kind;
* `_base`: `Store`, all of them together;
* `_sqlite`: the embedded engine (the zero-configuration default);
* `_postgres`: the fleet engine. It imports psycopg, so it is imported only by
  whoever opens a ``postgresql://`` control plane, never from here.
"""

from __future__ import annotations

from ._base import Store
from ._common import (
    DEFAULT_ENVIRONMENT_ID,
    RESPONSE_PREVIEW_CHARS,
    LeasePolicy,
    SubmitListener,
)
from ._sqlite import (  # _SCHEMA, SCHEMA_BEFORE_POLICIES, SCHEMA_V3: for migration tests
    _SCHEMA as _SCHEMA,
    SCHEMA_BEFORE_POLICIES as SCHEMA_BEFORE_POLICIES,
    SCHEMA_V3 as SCHEMA_V3,
    SCHEMA_VERSION,
    SQLiteStore,
)

__all__ = [
    "DEFAULT_ENVIRONMENT_ID",
    "RESPONSE_PREVIEW_CHARS",
    "SCHEMA_VERSION",
    "LeasePolicy",
    "SQLiteStore",
    "Store",
    "SubmitListener",
]
