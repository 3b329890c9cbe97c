"""The reaper process: kills a worker's agents at their lease deadline, or when the worker dies.

One per worker, started by `supervisor._worker._reaper.Reaper` as
``python -I -S <this file>`` (standard library only, so it starts in a few
milliseconds and imports nothing of the worker). It is a separate process on
purpose: a worker that is frozen (SIGSTOP, a swap storm, a debugger) or killed
(SIGKILL, the OOM killer) cannot stop its own agents, and the control plane
gives the item to another worker after its ttl.

Protocol: one JSON object per line on stdin, from the worker.

``{"op": "track", "tag": T, "deadline": D, "grace": G}``
    An agent run is about to start. ``D`` is its lease deadline on
    ``CLOCK_MONOTONIC`` (``time.monotonic()``, shared by every process of the
    machine); ``G`` the seconds between SIGTERM and SIGKILL at the deadline.
``{"op": "pid", "tag": T, "pid": P}``
    The agent started as ``P`` (the leader of its own session and process group).
``{"op": "renew", "tag": T, "deadline": D, "grace": G}``
    A heartbeat succeeded: the deadline moves (never backwards).
``{"op": "untrack", "tag": T}``
    The worker stopped the agent's process group itself: any process of the
    run still alive (one that escaped the group) is killed now, and the run is
    forgotten.

End of file on stdin (the lifeline) means the worker is gone, however it
went: every process of every tracked run gets SIGKILL at once, then the
reaper exits.

Who belongs to a run
====================

The members of a run are found by a ``/proc`` walk, by three marks:

* its process group and session (the leader's pid): everything the agent
  forks stays in both unless it calls ``setsid()``/``setpgid()``;
* ancestry: every descendant of a member, whatever its group or session, so a
  child that called ``setsid()`` is found while its parent lives. The walk
  runs every ``SCAN_INTERVAL`` seconds while runs are tracked and remembers
  every member it saw (by pid and start time), so a descendant whose parent
  exited (a double fork) stays known after it was reparented;
* the run's tag in the process's initial environment
  (``SUPERVISOR_AGENT_TAG``): a process that escaped the group, was
  orphaned before the walk saw it, and kept its environment is found too.

Only a process that escapes its group and session, is orphaned within one
scan interval, *and* drops the variable is missed; a cgroup would hold even
that one, but needs privileges a worker often does not have.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

TAG_VARIABLE = "SUPERVISOR_AGENT_TAG"
#: Seconds between ancestry walks while runs are tracked.
SCAN_INTERVAL = 0.25
#: How long the reaper keeps killing after the lifeline broke (a child forked
#: by the worker just before it died execs with the tag a moment later).
FINAL_SWEEP = 0.5
#: How long an untracked run's leftovers are still looked for.
UNTRACK_WATCH = 1.0
#: The soonest a sweep follows an untrack: what escaped a run the worker ended is
#: killed within about this long, and at hundreds of sessions a second one
#: snapshot serves every run untracked meanwhile (a snapshot costs about 1 ms of
#: CPU per hundred processes, so the delay caps the reaper's CPU).
UNTRACK_DELAY = 0.1
#: After a batch of commands, how long the reaper lets the next ones gather in the
#: pipe before it reads again: at hundreds of sessions a second (three or four
#: commands each) one wake-up then serves a dozen commands, not one. Commands
#: wait in the pipe in order, so none is lost, and a deadline or the lifeline's
#: end is acted on at most this much later.
READ_BATCH = 0.005


class Run:
    """One tracked agent run."""

    __slots__ = ("deadline", "forget_at", "grace", "kill_at", "pid", "state", "tag")

    def __init__(self, tag: str, deadline: float, grace: float) -> None:
        self.tag = tag
        self.pid: int | None = None
        self.deadline = deadline
        self.grace = grace
        self.kill_at = float("inf")
        self.forget_at = float("inf")
        #: "live", "terminating" (SIGTERM sent), "killing" (SIGKILL sent), "dead".
        self.state = "live"


Proc = tuple[int, int, int, int, str]  # ppid, pgrp, session, start time, state


def snapshot() -> dict[int, Proc]:
    """Every process: pid -> (ppid, pgrp, session, start time, state)."""
    procs: dict[int, Proc] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return procs
    for name in names:
        if not name.isdigit():
            continue
        # os.open/os.read: a file object per process costs a third more, at every sweep.
        try:
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
        except OSError:
            continue
        try:
            stat = os.read(fd, 4096)
        except OSError:
            continue
        finally:
            os.close(fd)
        fields = stat[stat.rfind(b")") + 2 :].split()
        try:
            procs[int(name)] = (
                int(fields[1]),
                int(fields[2]),
                int(fields[3]),
                int(fields[19]),
                fields[0].decode("ascii", "replace"),
            )
        except (IndexError, ValueError):
            continue
    return procs


def environ_tag(pid: int) -> str | None:
    """The run tag in a process's initial environment, if it can be read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    prefix = TAG_VARIABLE.encode() + b"="
    for entry in data.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode("ascii", "replace")
    return None


class Reaper:
    """The reaper's state: tracked runs and the members it has seen."""

    def __init__(self, worker_pid: int) -> None:
        self.worker_pid = worker_pid
        self.runs: dict[str, Run] = {}
        #: The runs not yet dead: the only ones `enforce` and `next_wakeup` look at
        #: (dead runs stay in ``runs`` while their leftovers are watched for).
        self.pending: dict[str, Run] = {}
        #: (pid, start time) -> tag, for every member a walk has seen.
        self.known: dict[tuple[int, int], str] = {}
        self.protected = {os.getpid(), worker_pid, 1}
        #: Where orphans end up: the worker (a child subreaper), or PID 1 once it is gone.
        self.orphanage = {worker_pid, 1}
        #: A run was untracked since the last sweep (its leftovers are due soon).
        self.untracked = False

    # -- membership ----------------------------------------------------------

    def members(
        self, procs: dict[int, Proc], tags: set[str], *, environ: bool, everyone: bool = False
    ) -> dict[int, str]:
        """Live members (pid -> tag) of the runs named by ``tags``.

        ``environ`` reads the tag from the environment of orphans (``everyone``:
        of every process, once the worker is gone and its orphans went who
        knows where: PID 1, or a subreaper above the worker).
        """
        # A dead run's group and session ids are not trusted: its leader is gone, and
        # after a long freeze its pid may belong to someone else. Its members are
        # known by pid and start time, or by the tag.
        leaders = {
            run.pid: run.tag
            for run in self.runs.values()
            if run.pid and run.tag in tags and run.state != "dead"
        }
        found: dict[int, str] = {}
        for pid, (_ppid, pgrp, sid, start, _state) in procs.items():
            tag = leaders.get(pgrp) or leaders.get(sid) or self.known.get((pid, start))
            if (
                tag is None
                and environ
                and pid not in self.protected
                and (everyone or procs[pid][0] in self.orphanage)
            ):
                # Only orphans are read (children of the worker, a subreaper, or of
                # PID 1): a process that left the group and lost its parent. Any
                # other process is found through its ancestry, or is no agent's.
                tag = environ_tag(pid)
            if tag is not None and tag in tags:
                found[pid] = tag
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_rest) in procs.items():
            children.setdefault(ppid, []).append(pid)
        todo = list(found)
        while todo:
            parent = todo.pop()
            for child in children.get(parent, ()):
                if child not in found:
                    found[child] = found[parent]
                    todo.append(child)
        for pid in self.protected:
            found.pop(pid, None)
        return {pid: tag for pid, tag in found.items() if procs[pid][4] not in ("Z", "X")}

    def remember(self, procs: dict[int, Proc]) -> None:
        """Record every current member of every run (the ancestry walk)."""
        members = self.members(procs, set(self.runs), environ=False)
        live = {(pid, proc[3]) for pid, proc in procs.items()}
        self.known = {key: tag for key, tag in self.known.items() if key in live}
        for pid, tag in members.items():
            self.known[(pid, procs[pid][3])] = tag

    # -- killing -------------------------------------------------------------

    def signal_runs(
        self, tags: set[str], sig: int, *, environ: bool = True, everyone: bool = False
    ) -> int:
        """Send ``sig`` to every member of the runs; how many processes got it."""
        if not tags:
            return 0
        procs = snapshot()
        members = self.members(procs, tags, environ=environ, everyone=everyone)
        for run in self.runs.values():
            if run.tag in tags and run.pid:
                try:
                    os.killpg(run.pid, sig)
                except OSError:
                    pass
        for pid in members:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        return len(members)

    def kill_now(self, tags: set[str], *, until: float) -> None:
        """SIGKILL every member of the runs, again and again, until none is left
        and ``until`` has passed."""
        quiet = 0
        while True:
            sent = self.signal_runs(tags, signal.SIGKILL, everyone=True)
            quiet = quiet + 1 if sent == 0 else 0
            if quiet >= 2 and time.monotonic() >= until:
                return
            time.sleep(0.005 if sent else 0.02)

    # -- commands ------------------------------------------------------------

    def apply(self, message: dict[str, object]) -> None:
        op, tag = message.get("op"), str(message.get("tag"))
        run = self.runs.get(tag)
        if op == "track":
            run = Run(tag, float(message["deadline"]), float(message["grace"]))  # type: ignore[arg-type]
            self.runs[tag] = self.pending[tag] = run
        elif run is None:
            return
        elif op == "pid":
            run.pid = int(message["pid"])  # type: ignore[call-overload]
        elif op == "renew":
            if run.state == "live":
                run.deadline = max(run.deadline, float(message["deadline"]))  # type: ignore[arg-type]
                run.grace = float(message["grace"])  # type: ignore[arg-type]
        elif op == "untrack":
            # The worker stopped the group itself; whatever of the run is left escaped
            # it. Such leftovers get SIGKILL from the next `enforce` for a short while
            # (one snapshot for every run untracked meanwhile), then the run is forgotten.
            run.state = "dead"
            run.forget_at = time.monotonic() + UNTRACK_WATCH
            self.pending.pop(tag, None)
            self.untracked = True

    def enforce(self, now: float) -> None:
        """SIGTERM the runs whose deadline passed, SIGKILL those whose grace ran out."""
        for run in list(self.pending.values()):
            if run.state == "live" and now >= run.deadline:
                run.state = "terminating"
                run.kill_at = run.deadline + run.grace
                late = (now - run.deadline) * 1000
                say(
                    f"run {run.tag} (pid {run.pid}) passed its lease deadline "
                    f"({late:.0f} ms ago): SIGTERM"
                )
                self.signal_runs({run.tag}, signal.SIGTERM)
            if run.state == "terminating" and now >= run.kill_at:
                run.state = "killing"
                say(f"run {run.tag} (pid {run.pid}): grace over, SIGKILL")
            if run.state == "killing" and not self.signal_runs({run.tag}, signal.SIGKILL):
                # Gone. A frozen worker may untrack it much later: meanwhile each
                # sweep kills whatever of it shows up again.
                run.state = "dead"
                del self.pending[run.tag]
                say(f"run {run.tag} (pid {run.pid}) is dead")

    def sweep(self, procs: dict[int, Proc], now: float) -> None:
        """The periodic pass, on one snapshot: remember every run's members, SIGKILL
        what is left of the dead and untracked runs, forget the runs watched long enough."""
        self.remember(procs)
        dead = {tag for tag, run in self.runs.items() if run.state == "dead"}
        if dead:
            for pid in self.members(procs, dead, environ=True):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for run in [r for r in self.runs.values() if now >= r.forget_at]:
            del self.runs[run.tag]
            self.known = {key: t for key, t in self.known.items() if t != run.tag}
        self.untracked = False

    def next_wakeup(self, now: float, next_sweep: float) -> float:
        wake = next_sweep if self.runs else now + 3600.0
        for run in self.pending.values():
            if run.state == "live":
                wake = min(wake, run.deadline)
            elif run.state == "terminating":
                wake = min(wake, run.kill_at, now + 0.02)
            elif run.state == "killing":
                wake = min(wake, now + 0.02)
        return wake


def say(text: str) -> None:
    """One line on stderr (the worker's log), with the wall time."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    try:
        os.write(2, f"{stamp}Z reaper[{os.getpid()}]: {text}\n".encode())
    except OSError:
        pass


def serve(fd: int, worker_pid: int) -> None:
    """Read commands from ``fd`` until it closes, enforcing deadlines meanwhile."""
    reaper = Reaper(worker_pid)
    buffer = b""
    last_sweep = 0.0
    while True:
        now = time.monotonic()
        reaper.enforce(now)
        # Leftovers of untracked runs are looked for soon, not at once: at hundreds of
        # sessions a second, one snapshot then serves every run untracked meanwhile.
        next_sweep = last_sweep + (UNTRACK_DELAY if reaper.untracked else SCAN_INTERVAL)
        if reaper.runs and now >= next_sweep:
            reaper.sweep(snapshot(), now)
            last_sweep = now
            next_sweep = now + SCAN_INTERVAL
        timeout = max(0.0, reaper.next_wakeup(now, next_sweep) - time.monotonic())
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        except InterruptedError:
            continue
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            break
        buffer += data
        while len(data) == 65536:  # drain what is waiting: one enforce pass for the batch
            ready, _, _ = select.select([fd], [], [], 0)
            if not ready:
                break
            data = os.read(fd, 65536)
            if not data:
                break
            buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
                reaper.apply(message)
            except (ValueError, KeyError, TypeError) as exc:
                say(f"ignored a bad command: {exc}")
        time.sleep(READ_BATCH)
    live = {tag for tag, run in reaper.runs.items() if run.state != "dead"}
    if live:
        say(f"the worker is gone: killing {len(live)} agent run(s)")
        reaper.kill_now(set(reaper.runs), until=time.monotonic() + FINAL_SWEEP)
    elif reaper.runs:
        # A clean close: only what escaped runs the worker already ended may be left.
        reaper.signal_runs(set(reaper.runs), signal.SIGKILL)


def main() -> int:
    """Run until the worker closes the lifeline (stdin) or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the worker's to handle
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    worker_pid = int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid()
    serve(0, worker_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
