"""In-memory twins of the package's boundaries, for unit tests of the layers above them.

Tests of the boundaries themselves use the real parts (a real SQLite file, the
reference server on loopback, real subprocesses); these fakes are for testing
the code *built on* those boundaries quickly and deterministically.
"""

from ._clock import ManualClock as ManualClock
from ._scripted import (
    HANG as HANG,
    Call as Call,
    Fail as Fail,
    Hang as Hang,
    Regrant as Regrant,
    Reply as Reply,
    ScriptedControlPlane as ScriptedControlPlane,
    ScriptEntry as ScriptEntry,
)

__all__ = [
    "HANG",
    "Call",
    "Fail",
    "Hang",
    "ManualClock",
    "Regrant",
    "Reply",
    "ScriptEntry",
    "ScriptedControlPlane",
]
