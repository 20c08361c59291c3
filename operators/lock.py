"""One writer per output: a lock object in the output store, created with a conditional write.

``OutputLock(output_path, storage)`` creates ``<output>/_LOCK.json`` only if it does not exist:
on S3 with ``PutObject`` and ``If-None-Match: *`` (the store refuses a second create with 412
PreconditionFailed, atomically, whatever the number of writers), on a local path with
``open(O_CREAT | O_EXCL)``. The holder rewrites the object's ``heartbeat`` every
``heartbeat_s`` from a daemon thread, so a lock whose heartbeat is older than ``stale_after_s`` (its
holder died without releasing: a killed driver, a lost node) is taken over, with a warning that names
the old holder. On the same host a holder whose process is gone is stale at once. Release deletes
the object, only if it is still ours; ``with OutputLock(...)`` releases on any exception, so a run
that fails leaves no lock behind.

Takeover deletes the stale object and creates a new one conditionally; of two takers at once one
wins the create and the other gets ``LockHeld``. (Between a taker's delete and its create, a third
writer could create first: it then holds the lock and the taker gets ``LockHeld``; nobody is ever
told it holds a lock that another holds.)
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from operators.storage import StorageConfig, fsspec_fs, join

log = logging.getLogger(__name__)

LOCK_NAME = "_LOCK.json"


class LockHeld(RuntimeError):
    """Another run holds the output's lock."""


def _is_s3(path: str) -> bool:
    return path.startswith(("s3://", "s3a://"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    def __init__(self, output_path: str, storage: StorageConfig | None = None, purpose: str = "run",
                 stale_after_s: float = 900.0, heartbeat_s: float = 60.0, name: str = LOCK_NAME):
        if heartbeat_s >= stale_after_s:
            raise ValueError(f"lock heartbeat ({heartbeat_s} s) must be shorter than stale_after_s ({stale_after_s} s)")
        self.path = join(output_path, name)
        self.storage = storage
        self.purpose = purpose
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the object ---------------------------------------------------------------------------------
    def _body(self, created: str | None = None) -> bytes:
        now = datetime.now(timezone.utc).isoformat()
        return json.dumps({"token": self.token, "purpose": self.purpose, "host": socket.gethostname(),
                           "pid": os.getpid(), "created": created or now, "heartbeat": now,
                           "heartbeat_unix": time.time(), "stale_after_s": self.stale_after_s}).encode()

    def _create(self) -> bool:
        """Create the lock object if absent; False if it exists."""
        fs, p = fsspec_fs(self.path, self.storage)
        body = self._body()
        if _is_s3(self.path):
            bucket, _, key = p.partition("/")
            try:
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
                return False
            return True
        os.makedirs(posixpath.dirname(p), exist_ok=True)
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
        return True

    def read(self) -> dict | None:
        fs, p = fsspec_fs(self.path, self.storage)
        try:
            with fs.open(p, "rb") as fh:
                return json.loads(fh.read() or b"{}")
        except FileNotFoundError:
            return None
        except ValueError:  # a torn local write: treat as stale garbage
            return {}

    def _delete(self) -> None:
        fs, p = fsspec_fs(self.path, self.storage)
        try:
            fs.rm(p)
        except FileNotFoundError:
            pass

    def stale(self, holder: dict) -> str | None:
        """Why ``holder``'s lock is stale, or None while it is live."""
        if not holder:
            return "the lock object is unreadable"
        age = time.time() - float(holder.get("heartbeat_unix", 0))
        limit = float(holder.get("stale_after_s", self.stale_after_s))
        if age > limit:
            return f"its heartbeat is {age:.0f} s old (stale after {limit:.0f} s)"
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                and holder["pid"] != os.getpid() and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        return None

    # -- acquire / release --------------------------------------------------------------------------
    def acquire(self) -> "OutputLock":
        if self._create():
            return self._held()
        holder = self.read()
        if holder is None:  # released between our create and our read
            if self._create():
                return self._held()
            holder = self.read() or {}
        why = self.stale(holder)
        if why is None:
            raise LockHeld(f"{self.path} is held by a {holder.get('purpose', '?')} on {holder.get('host', '?')} "
                           f"(pid {holder.get('pid', '?')}, since {holder.get('created', '?')}, last heartbeat "
                           f"{holder.get('heartbeat', '?')}): two runs of one output never run at once; wait for "
                           f"it, or remove the lock if you know it is dead")
        log.warning("lock %s: taking over from %s on %s (pid %s): %s", self.path, holder.get("purpose", "?"),
                    holder.get("host", "?"), holder.get("pid", "?"), why)
        self._delete()
        if not self._create():
            holder = self.read() or {}
            raise LockHeld(f"{self.path}: another run took the stale lock first ({holder.get('host', '?')}, "
                           f"pid {holder.get('pid', '?')})")
        return self._held()

    def _held(self) -> "OutputLock":
        self.held = True
        self.created = (self.read() or {}).get("created")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="imgcurate-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self.read()
                if not holder or holder.get("token") != self.token:
                    log.error("lock %s: no longer ours (taken over as stale?); heartbeat stopped", self.path)
                    return
                fs, p = fsspec_fs(self.path, self.storage)
                with fs.open(p, "wb") as fh:
                    fh.write(self._body(self.created))
            except Exception as exc:  # noqa: BLE001 - a failed heartbeat is retried at the next beat
                log.warning("lock %s: heartbeat failed: %s", self.path, exc)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.read()
        if holder and holder.get("token") == self.token:
            self._delete()
        self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
