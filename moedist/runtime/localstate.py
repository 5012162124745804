"""The private record kept by `cluster/local up`: where it lives, how the processes it
started are recognised again, and which address `--address auto` should prefer.

The record is a JSON file in a folder only its owner can read or write (mode 0700, by
default ~/.cache/moedist/cluster). Each node is recorded as the process `up` started (pid,
start time since boot, command line, boot id): a pid alone may belong to an unrelated
process by the time it is read again, so nothing is signalled or trusted unless all of
them still match. Linux only (it reads /proc), as is cluster/local.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILE = "cluster.json"


class StateError(ValueError):
    """The state folder or its record cannot be trusted or read; the message says why."""


def default_state_dir() -> Path:
    """~/.cache/moedist/cluster: per user, so no other user can plant or read a record."""
    return Path.home() / ".cache" / "moedist" / "cluster"


def check_private(path: Path) -> None:
    """Raise StateError unless `path` is a real folder owned by this user with mode 0700
    (no access at all for group and others)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise StateError(f"state folder {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise StateError(f"state folder {path} is a symbolic link; use a real folder (--state-dir)")
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"state folder {path} is not a folder")
    if st.st_uid != os.getuid():
        raise StateError(f"state folder {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); "
                         "use another --state-dir")  # fmt: skip
    if st.st_mode & 0o077:
        raise StateError(f"state folder {path} has mode {stat.S_IMODE(st.st_mode):04o}, it must be private "
                         f"(0700): chmod 700 {path}")  # fmt: skip


def ensure_private_dir(path: Path) -> Path:
    """Create `path` with mode 0700 if it is missing (parents as usual), then check it."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass  # checked below: an existing folder must already be private
    except OSError as e:
        raise StateError(f"cannot create state folder {path}: {e.strerror}") from None
    check_private(path)
    return path


def read_state(state_dir: Path) -> dict[str, Any] | None:
    """The record in a private `state_dir`, or None when there is none."""
    state_dir = Path(state_dir).expanduser()
    if not state_dir.exists() and not state_dir.is_symlink():
        return None
    check_private(state_dir)
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StateError(f"cannot read {state_dir / STATE_FILE}: {e}") from None


def write_state(state_dir: Path, state: dict[str, Any]) -> None:
    """Replace the record atomically (a reader never sees half a file)."""
    tmp = Path(state_dir) / (STATE_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, Path(state_dir) / STATE_FILE)


def secure_token_file() -> None:
    """Make this user's Ray token file (~/.ray/auth_token) readable by its owner only.

    Ray writes it with the default umask (usually 0644), so any local user could read the
    token and control the cluster. Files owned by someone else are left alone."""
    token = Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(OSError):
        st = os.stat(token)
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(token, 0o600)


# ------------------------------------------------------------------ processes
def boot_id() -> str:
    """This boot's id: start times count from boot, so a record from another boot is stale."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat that identify a process and its family."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    sid: int
    start: int  # clock ticks since boot


def proc_stat(pid: int) -> ProcStat | None:
    """/proc/PID/stat, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or ")".
    fields = text.rsplit(")", 1)[1].split()
    return ProcStat(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def describe(pid: int) -> dict[str, Any]:
    """What identifies process `pid` later: {"pid", "start", "cmdline", "boot"}."""
    st = proc_stat(pid)
    cmdline = proc_cmdline(pid)
    # A child that has just exec'd may show an empty command line for a moment (its
    # parent resumes before the kernel has set up the new arguments): wait for them.
    deadline = time.monotonic() + 5
    while st is not None and not cmdline and time.monotonic() < deadline:
        time.sleep(0.01)
        st, cmdline = proc_stat(pid), proc_cmdline(pid)
    if st is None or not cmdline:
        raise StateError(f"process {pid} exited at once")
    return {"pid": pid, "start": st.start, "cmdline": cmdline, "boot": boot_id()}


def is_recorded_process(rec: dict[str, Any]) -> bool:
    """True while `rec["pid"]` is still the very process recorded (same boot, start time
    and command line) and not a zombie."""
    st = proc_stat(int(rec["pid"]))
    if st is None or st.state in ("Z", "X") or rec.get("boot") != boot_id():
        return False
    return st.start == rec.get("start") and proc_cmdline(st.pid) == rec.get("cmdline")


def all_procs() -> dict[int, ProcStat]:
    """Every live (non-zombie) process of the machine, by pid."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None and st.state not in ("Z", "X"):
                out[st.pid] = st
    return out


def node_processes(rec: dict[str, Any], procs: dict[int, ProcStat] | None = None) -> dict[int, int]:
    """pid -> start time of every process that belongs to the node recorded in `rec`.

    The recorded process was started as the leader of its own session, so Ray's processes
    for the node (GCS, raylet, dashboard, workers) are members of that session, and job
    drivers (which Ray starts in sessions of their own) are their descendants. A session
    id cannot be reused while one member is alive, so once the leader is gone its
    remaining members are still recognised. If the pid now belongs to another process,
    the session is gone and nothing is returned.
    """
    procs = all_procs() if procs is None else procs
    pid, start = int(rec["pid"]), int(rec["start"])
    if rec.get("boot") != boot_id():
        return {}
    if pid in procs and not is_recorded_process(rec):
        return {}  # the pid was reused: our session ended before that was possible
    mine = {p: s.start for p, s in procs.items() if s.sid == pid and s.start >= start}
    if pid in procs:  # the recorded process itself (checked above), session leader or not
        mine[pid] = procs[pid].start
    children: dict[int, list[int]] = {}
    for s in procs.values():
        children.setdefault(s.ppid, []).append(s.pid)
    todo = list(mine)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in mine and procs[c].start >= start:
                mine[c] = procs[c].start
                todo.append(c)
    return mine


def still_running(pids: dict[int, int]) -> dict[int, int]:
    """The entries of pid -> start time that are still the same live processes."""
    out = {}
    for pid, start in pids.items():
        st = proc_stat(pid)
        if st is not None and st.start == start and st.state not in ("Z", "X"):
            out[pid] = start
    return out


def signal_if_same(pid: int, start: int, sig: int) -> bool:
    """Send `sig` to `pid` only if it is still the process that started at `start`."""
    st = proc_stat(pid)
    if st is None or st.start != start or st.state in ("Z", "X"):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
        return True
    return False


# -------------------------------------------------------------- recorded cluster
def recorded_cluster(state_dir: Path | None = None) -> dict[str, Any] | None:
    """The record of a cluster `cluster/local up` started for this user whose head node is
    still the process it started; None if there is no such cluster."""
    state_dir = default_state_dir() if state_dir is None else Path(state_dir)
    st = read_state(state_dir)
    if not st or not st.get("nodes"):
        return None
    return st if is_recorded_process(st["nodes"][0]) else None
