"""One run at a time in a run directory: a lock with a lease, on local disk and on S3.

The driver takes `<run_dir>/run.lock` before it writes anything there and holds it until it
exits; the same command started again on that directory meanwhile is refused at once, naming the
holder (host, pid, since when). The lock is a lease: the holder renews it every `RENEW_S`, so a
holder that died without releasing it (a SIGKILL, a lost machine) keeps the directory for at most
`LEASE_S` after its last renewal, and the next run takes it over. The record is JSON
{token, host, pid, since, expires, lease_s}; an empty record is a free lock (released).

What makes taking, renewing, taking over and releasing atomic, by where the run directory is:
- local disk: each read-decide-write of the record runs under an exclusive `flock` of the file
  itself, so contenders on this host go one at a time (and on hosts sharing an NFS mount, where
  Linux turns flock into NFS byte-range locks that the server arbitrates). The file is never deleted, so no one ever holds a lock on a deleted file.
- s3://: conditional writes. A record is created with `If-None-Match: *` and replaced (renewed,
  taken over, released) with `If-Match: <the ETag read>`: of two contenders exactly one succeeds;
  the other re-reads and finds the winner's record. AWS S3 and moto honour both headers; an
  S3-compatible store that ignores them gives no mutual exclusion.
- other protocols (gs://, ...): no conditional write is wired here; the run goes on without a
  lock, and says so.
Expiry compares the holder's clock (the `expires` it wrote) with the reader's: hosts sharing a run
directory need clocks within seconds of each other (NTP), far less than `LEASE_S`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

from md4_dist.data.storage import StorageConfig, StorageError, explain, filesystem, join, protocol

LOCK_NAME = "run.lock"
LEASE_S = 60.0  # how long a holder that stopped renewing keeps the directory
RENEW_S = 10.0  # so that five renewals in a row may fail (storage unreachable) before it lapses
FLOCK_TIMEOUT_S = 10.0  # holders of the file lock only read and write a few hundred bytes


class RunLocked(RuntimeError):
    """Another live run holds the run directory; the message names it and the holder."""


def describe(record: dict) -> str:
    left = record["expires"] - time.time()
    return (f"host {record['host']} pid {record['pid']}, since {record['since']} (its lease "
            f"{'ends in' if left >= 0 else 'ended'} {abs(left):.0f} s{'' if left >= 0 else ' ago'})")


class _LocalRecord:
    """The record on local disk, changed under an exclusive flock of the file."""

    def __init__(self, url: str):
        _, self.path = filesystem(url)
        self.url = url

    def update(self, change) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + FLOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StorageError(f"{self.url}: another process held its file lock for "
                                           f"over {FLOCK_TIMEOUT_S:.0f} s") from None
                    time.sleep(0.05)
            with os.fdopen(os.dup(fd), "rb") as f:
                old = f.read()
            new = change(_parse(old, self.url))
            if new is not None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, new, 0)
                os.fsync(fd)
        finally:
            os.close(fd)  # releases the flock


class _S3Record:
    """The record on S3, replaced only if unchanged since read (conditional writes)."""

    def __init__(self, url: str, storage: StorageConfig | None):
        self.fs, self.path = filesystem(url, storage)
        self.url = url

    def update(self, change) -> None:
        for _ in range(2):  # a lost race re-reads once: the winner's record then decides
            etag, old = self._read()
            new = change(_parse(old, self.url))
            if new is None or self._write(new, etag):
                return
        raise StorageError(f"{self.url}: changed by another process at every try")

    def _read(self) -> tuple[str | None, bytes]:
        """(ETag, bytes); (None, b"") when absent. The ETag first: a write between the two makes
        it stale, so the conditional write fails instead of replacing a record not read."""
        try:
            self.fs.invalidate_cache(self.path)
            return self.fs.info(self.path)["ETag"], self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, b""
        except Exception as e:  # noqa: BLE001 - re-raised with the URL named
            raise explain(self.url, e) from e

    def _write(self, data: bytes, etag: str | None) -> bool:
        """Write if the record is still the one read; False if it is not (a lost race)."""
        try:
            if etag is None:
                self.fs.pipe_file(self.path, data, mode="create")  # If-None-Match: *
            else:
                self.fs.pipe_file(self.path, data, IfMatch=etag)
            return True
        except Exception as e:  # noqa: BLE001 - a lost race is an answer, the rest is named
            if _precondition_failed(e):
                return False
            raise explain(self.url, e) from e


def _precondition_failed(e: BaseException) -> bool:
    """S3 refused a conditional write: the object changed (412) or a concurrent conditional
    write is in progress (409)."""
    if isinstance(e, FileExistsError):  # how s3fs reports a failed If-None-Match
        return True
    response = getattr(e.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict")


def _parse(data: bytes, url: str) -> dict | None:
    if not data.strip():
        return None
    try:
        record = json.loads(data)
        if {"token", "host", "pid", "since", "expires", "lease_s"} <= set(record):
            return record
    except (ValueError, TypeError):
        pass
    raise StorageError(f"{url} is not a run lock record (JSON with token, host, pid, since, "
                       "expires, lease_s): remove it if no run uses this directory")


class RunLock:
    """The lock on one run directory, held by this process. Use as a context manager: inside,
    a thread renews the lease; on leaving (a SIGTERM's exit included), it is released."""

    def __init__(self, run_dir: str, record, lease_s: float):
        self.run_dir, self._record, self.lease_s = run_dir, record, lease_s
        self.url = join(run_dir, LOCK_NAME)
        self.token = uuid.uuid4().hex
        self.since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.lost = ""  # why the lease was lost, if it was
        self._stop = threading.Event()
        self._renewer = None

    def _mine(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": self.since, "expires": time.time() + self.lease_s,
                           "lease_s": self.lease_s}).encode()

    def _take(self) -> None:
        lapsed = []  # the lapsed holder replaced, for the note once the write has succeeded

        def change(old):
            lapsed.clear()
            if old is not None and old["expires"] >= time.time():
                raise RunLocked(f"config key 'train.run_dir': {self.run_dir} is in use by another "
                                f"run: {describe(old)}. Wait for it to end or stop it; if it has "
                                f"died, its lock ({self.url}) lapses {old['lease_s']:.0f} s after "
                                "its last renewal. Or choose another run directory")
            if old is not None:
                lapsed.append(describe(old))
            return self._mine()

        self._record.update(change)
        if lapsed:
            print(f"taking over {self.url}: the lease of the run that held it has lapsed "
                  f"({lapsed[0]})", flush=True)

    def renew(self) -> bool:
        """Extend the lease; False (and `lost` says why) once another run has taken it."""
        def change(old):
            if old is None or old["token"] != self.token:
                self.lost = f"now held by {describe(old)}" if old else "released by another process"
                return None
            return self._mine()

        if self._record is not None and not self.lost:
            self._record.update(change)
        return not self.lost

    def release(self) -> None:
        if self._record is not None and not self.lost:
            self._record.update(lambda old: b"" if old and old["token"] == self.token else None)

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                if not self.renew():
                    print(f"error: this run lost its lock on {self.run_dir} ({self.url}): "
                          f"{self.lost}; two runs may now write there", file=sys.stderr, flush=True)
                    return
            except OSError as e:  # the next renewal tries again, well within the lease
                print(f"warning: could not renew the lock {self.url}: {e}", file=sys.stderr, flush=True)

    def __enter__(self) -> RunLock:
        if self._record is not None:
            self._renewer = threading.Thread(target=self._renew_until_stopped, daemon=True,
                                             name="run-lock-renewal")
            self._renewer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=60)  # at most one renewal in flight, its waits bounded
        try:
            self.release()
        except OSError as e:
            print(f"warning: could not release the lock {self.url} ({e}); it lapses "
                  f"{self.lease_s:.0f} s after its last renewal", file=sys.stderr, flush=True)


def take(run_dir: str, storage: StorageConfig | None = None, lease_s: float = LEASE_S) -> RunLock:
    """Take the lock on `run_dir` (a free or lapsed one), or raise RunLocked naming its holder.
    Enter the returned lock (`with`) to renew it while the run lives and release it after."""
    url = join(run_dir, LOCK_NAME)
    proto = protocol(run_dir)
    if proto == "file":
        record = _LocalRecord(url)
    elif proto in ("s3", "s3a"):
        record = _S3Record(url, storage)
    else:
        print(f"note: no run lock on {proto}:// (implemented for local disk and s3://): make "
              f"sure no other run uses {run_dir}", flush=True)
        return RunLock(run_dir, None, lease_s)
    lock = RunLock(run_dir, record, lease_s)
    try:
        lock._take()
    except OSError as e:
        if isinstance(e, StorageError):
            raise
        raise explain(url, e) from e
    return lock
