"""In-memory twins of the package's boundaries, for unit tests of the layers above them.

Tests of the boundaries themselves use the real parts (a real SQLite file, the
reference server on loopback, real subprocesses); these fakes are for testing
the code *built on* those boundaries quickly and deterministically.
"""

from ._clock import ManualClock as ManualClock
from ._faults import (
    CallRecord as CallRecord,
    Fault as Fault,
    FaultKind as FaultKind,
    FaultyControlPlane as FaultyControlPlane,
)
from ._proxy import (
    ChaosProxy as ChaosProxy,
    ProxyFault as ProxyFault,
    ProxyFaults as ProxyFaults,
    ProxyRecord as ProxyRecord,
)
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
from ._sim import (
    Behaviour as Behaviour,
    FaultMix as FaultMix,
    SimConfig as SimConfig,
    SimResult as SimResult,
    Simulation as Simulation,
    Violation as Violation,
    generate_schedule as generate_schedule,
    run_inline as run_inline,
    run_simulation as run_simulation,
)
from ._workspaces import MemoryWorkspaces as MemoryWorkspaces
from .chaos import ChaosConfig as ChaosConfig, ChaosReport as ChaosReport, run_chaos as run_chaos

__all__ = [
    "Behaviour",
    "Call",
    "CallRecord",
    "ChaosConfig",
    "ChaosProxy",
    "ChaosReport",
    "Fail",
    "Fault",
    "FaultKind",
    "FaultMix",
    "FaultyControlPlane",
    "HANG",
    "Hang",
    "ManualClock",
    "MemoryWorkspaces",
    "ProxyFault",
    "ProxyFaults",
    "ProxyRecord",
    "Regrant",
    "Reply",
    "ScriptEntry",
    "ScriptedControlPlane",
    "SimConfig",
    "SimResult",
    "Simulation",
    "Violation",
    "generate_schedule",
    "run_chaos",
    "run_inline",
    "run_simulation",
]
