"""One live run per store: an exclusive `flock` on `<store>.lock` beside it."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import sys
import weakref
from pathlib import Path

from routing_suite.errors import ConfigError

log = logging.getLogger(__name__)


class StoreBusy(ConfigError):
    """Another live process holds the store's lock."""


class StoreLock:
    """An exclusive lock on one store, `<store>.lock` beside it (the store itself is renamed
    when it completes), held from `RunStore.open` until `finish`, or until every
    RunStore of it in this process is gone, or the process ends.

    `flock`: the kernel drops the lock of a process that dies (even by SIGKILL), so
    a lock left by a dead process is simply taken over; the file only says who
    holds it, for the refusal's message. A process that opens a store it already
    holds shares its lock."""

    _held: weakref.WeakValueDictionary[Path, StoreLock] = weakref.WeakValueDictionary()

    def __init__(self, path: Path, handle) -> None:
        self.path, self.handle = path, handle

    @classmethod
    def acquire(cls, store: Path) -> StoreLock:
        path = store.with_name(store.name + ".lock").absolute()
        held = cls._held.get(path)
        if held is not None and held.handle is not None:
            return held
        while True:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lock's life
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = _owner(handle.read())
                handle.close()
                raise StoreBusy(
                    f"store {str(store)!r} is in use by {owner}; wait for that run to end, or stop it "
                    "(a lock whose process has died is taken over by the next run)"
                ) from None
            try:  # its last holder may have removed the file between our open and our lock: lock the new one
                if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        if previous := handle.read().strip():
            log.info("store %s: taking over the lock left by %s, which is no longer running", store, _owner(previous))
        handle.seek(0)
        handle.truncate()
        main = sys.modules.get("__main__")
        entry = getattr(getattr(main, "__spec__", None), "name", None) or Path(sys.argv[0]).name
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "entry": entry, "since": started}))
        handle.flush()
        lock = cls(path, handle)
        cls._held[path] = lock
        return lock

    def release(self) -> None:
        if self.handle is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.handle.fileno()).st_ino:
                self.path.unlink()  # removed while still locked: whoever opened it meanwhile locks a fresh one
        self.handle.close()  # closing drops the flock
        self.handle = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the modules it needs may be gone; the kernel lets go anyway
            pass


def _owner(text: str) -> str:
    """Who holds a lock, from what its file says (the machine's name only when it is not this one)."""
    try:
        info = json.loads(text)
    except ValueError:
        return "another process"
    where = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
    return f"process {info.get('pid')}{where} ({info.get('entry')}, since {info.get('since')})"
