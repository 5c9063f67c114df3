"""Build locks: one process builds what several need at once (the image cache, its copies, the demo
data), on one host or on many nodes sharing a folder, while the others wait on the files. A lock
names its owner (host, boot, PID namespace, pid, token) and is taken over when that owner is
provably dead, else only once its heartbeat is stale. Correctness never rests on a lock: every file
it guards is written atomically, so a second builder could only waste time."""
from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from common import _discard

LOCK_STALE_S = 600  # a build lock untouched this long is taken over: its builder hung, or its host died
LOCK_POLL_S = 1.0   # how often a process waiting on another's build looks again


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process; a number no pid can be
        pass
    return True


def identity() -> dict:
    """Who this process is, as another process can check it: host, boot (a rebooted host reuses
    pids), PID namespace (containers sharing a hostname each count pids from 1) and pid."""
    def read(f: Callable[[], str]) -> str:
        try:
            return f().strip()
        except OSError:
            return ""  # not Linux: host and pid only, as before
    return {"host": socket.gethostname(), "boot": read(Path("/proc/sys/kernel/random/boot_id").read_text),
            "pidns": read(lambda: os.readlink("/proc/self/ns/pid")), "pid": os.getpid()}


class BuildLock:
    """This process's claim, by lock file, to build what other processes wait for (see claim_build).
    touch() as the work goes on (a heartbeat); release() (or leaving a `with`) removes the file, unless
    another process has taken it over since (its token is not this one's)."""

    def __init__(self, path: Path, token: str = ""):
        self.path, self.token = Path(path), token

    def touch(self) -> None:
        try:
            os.utime(self.path)
        except OSError:
            pass

    def release(self) -> None:
        if (lock_owner(self.path) or {}).get("token") == self.token:
            _discard(self.path)

    def __enter__(self) -> "BuildLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_owner(path: Path) -> dict | None:
    """The owner written in a lock file ({host, boot, pidns, pid, token}, or {host, pid} from a
    lock of an earlier version: 'HOST PID'); None when there is none (or it is not written yet)."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    try:
        owner = json.loads(text)
        return owner if isinstance(owner, dict) else None
    except ValueError:
        host, _, pid = text.partition(" ")
        return {"host": host, "pid": int(pid)} if pid.isdigit() else None


def describe(owner: dict | None) -> str:
    return f"{owner.get('host')} (pid {owner.get('pid')})" if owner else "another process"


def owner_gone(owner: dict | None) -> bool:
    """The lock's owner is provably dead: same host, same boot and same PID namespace as this process
    (an earlier version's lock: same host), and no process with its pid."""
    me = identity()
    if not owner or owner.get("host") != me["host"] or not isinstance(owner.get("pid"), int):
        return False
    if "token" in owner and (owner.get("boot"), owner.get("pidns")) != (me["boot"], me["pidns"]):
        return False  # another boot or another container: its pid says nothing here
    return not pid_alive(owner["pid"])


def lock_stale(path: Path) -> bool:
    """A lock whose builder is gone (owner_gone), or whose heartbeat stopped LOCK_STALE_S ago (the
    builder hung, or its host died, or it runs where its pid cannot be checked from here)."""
    try:
        age = time.time() - Path(path).stat().st_mtime
    except OSError:
        return False  # released meanwhile
    return age > LOCK_STALE_S or owner_gone(lock_owner(path))


def take_over(lock: Path, owner: dict | None) -> bool:
    """Remove the stale lock whose owner is `owner`. It is first moved aside and read again: when
    another waiter has taken it over meanwhile, that fresh lock is put back and False returned."""
    aside = lock.with_name(f".{lock.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except OSError:
        return False
    taken = lock_owner(aside) == owner
    if not taken:
        try:
            os.link(aside, lock)
        except OSError:
            pass  # a newer lock is there already: correctness never rests on the lock (see claim_build)
    _discard(aside)
    return taken


def claim_build(lock: Path, done: Callable[[], bool], what: str) -> BuildLock | None:
    """For work that several processes need at once (torchrun's ranks, the nodes of a job, array
    tasks): returns None once done() holds, or a BuildLock when this process is to do the work.

    A process that finds the work undone tries to create `lock` (O_CREAT | O_EXCL: exactly one
    wins, on one host or on many sharing the folder) and writes who it is (host, boot id, PID
    namespace, pid, a random token); the others wait on the files, polling with no timeout, never
    inside a torch.distributed collective (whose timeout a long build outlasts). A lock is taken over
    when its owner is provably dead, else only once its heartbeat is stale (see lock_stale).
    Correctness never rests on the lock: every file is written atomically, so a second builder
    could only waste time."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while not done():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = lock_owner(lock)
            if lock_stale(lock):
                if take_over(lock, owner):
                    why = "which is gone" if owner_gone(owner) else f"silent for over {LOCK_STALE_S} s"
                    print(f"taking over {what} from {describe(owner)}, {why}", file=sys.stderr, flush=True)
                continue
            if not told:
                print(f"waiting for {what}, being built by {describe(owner)}", file=sys.stderr, flush=True)
                told = True
            while lock.exists() and not lock_stale(lock):
                time.sleep(LOCK_POLL_S)
            continue
        token = secrets.token_hex(8)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({**identity(), "token": token}) + "\n")
        return BuildLock(lock, token)
    return None
