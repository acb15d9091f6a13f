"""The preprocessed-data cache on a file system that several nodes share: one builder, atomic publish.

Under `cache_dir`, for a cache fingerprint F (dataset.py says what it covers):

    mmtune-F/                      the published cache (datasets.save_to_disk) + mmtune_build.json
    mmtune-F.lock                  exists while one process builds it (who, since when)
    mmtune-F.status                the builder's progress (samples done / total), for the waiters
    mmtune-F.building-HOST-PID/    the builder's staging dir
    mmtune-F.old-TIME/             a cache replaced by a rebuild (never deleted by mmtune)

`get_or_build` is the protocol every process follows, whatever its rank or node:
1. A published cache is read as it is: a published dir never changes afterwards.
2. Otherwise the process tries to create the lock file with O_CREAT | O_EXCL (atomic on local file
   systems and on NFS). The one that succeeds builds into its staging dir, touches the lock every
   HEARTBEAT_S seconds, publishes with one `rename`, and removes the lock.
3. The others wait, showing the builder's progress, until the cache is published or the lock goes
   away. There is no timeout on the build itself: a lock counts as abandoned only when its mtime has
   not moved for STALE_S seconds of the waiter's own clock (the builder died); a waiter then removes
   it and step 2 runs again.
Publishing never deletes a cache: when a rebuild (`overwrite_cache`, or data/dataset.py's rebuild of a
cache whose missing image files have appeared) replaces one, the old dir is renamed to
`mmtune-F.old-TIME` (processes that opened it keep reading it) and left for the user to delete.
Correctness never rests on the lock: if two processes ever build (a lock wrongly judged abandoned), the
second finds the first one's cache published and drops its own.

`overwrite_cache` rebuilds once per job: all ranks share one token (rank 0's, broadcast) and accept a
cache built under that token; a single process gets a fresh token and always rebuilds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0  # the builder touches its lock this often
STALE_S = 300.0  # a lock untouched this long is abandoned (above NFS's 60 s attribute caching)
POLL_S = 1.0  # how often a waiter looks
BUILD_FILE = "mmtune_build.json"


@dataclass
class CacheResult:
    path: Path
    built: bool  # this process built it (else it was published already, or by another process)
    waited_s: float = 0.0  # time spent waiting for another builder
    builder: str = ""  # host:pid that built it


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def rebuild_token() -> str:
    """One token per job for overwrite_cache: rank 0's, broadcast to all ranks under torch.distributed."""
    token = uuid.uuid4().hex
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [token]
        dist.broadcast_object_list(box, src=0)
        token = box[0]
    return token


def read_build_info(path: Path) -> dict:
    try:
        return json.loads((path / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _acceptable(path: Path, token: str | None) -> bool:
    if not path.is_dir() or not (path / BUILD_FILE).is_file():
        return False
    return token is None or read_build_info(path).get("token") == token


class BuildLock:
    """The builder's lock file (O_EXCL), kept alive by a heartbeat thread that also writes progress."""

    def __init__(self, path: Path, status: Path):
        self.path, self.status = path, status
        self.progress = {"done": 0, "total": None, "phase": "starting"}
        self.id = ""  # this build's id, also in the lock file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="mmtune-cache-lock")

    @classmethod
    def try_acquire(cls, path: Path, status: Path) -> BuildLock | None:
        """The lock, or None when another process holds it. The lock file appears with its contents at
        once: written to a private file, then hard-linked to its name (atomic, fails if the name exists;
        the classic lock that also holds on NFS)."""
        build_id = uuid.uuid4().hex
        tmp = path.with_name(f"{path.name}.{build_id}.tmp")
        tmp.write_text(json.dumps({"builder": _me(), "id": build_id, "started": time.time()}))
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        except OSError:  # a file system without hard links: O_EXCL creation, then the contents
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
        finally:
            tmp.unlink()
        lock = cls(path, status)
        lock.id = build_id
        lock._write_status()
        lock._thread.start()
        return lock

    def update(self, done: int, total: int | None = None, phase: str | None = None) -> None:
        self.progress["done"] = done
        if total is not None:
            self.progress["total"] = total
        if phase is not None:
            self.progress["phase"] = phase

    def _write_status(self) -> None:
        tmp = self.status.with_name(f"{self.status.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"builder": _me(), **self.progress}))
            os.replace(tmp, self.status)
        except OSError:
            pass  # progress is informative only

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass
            self._write_status()

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        mine = _read_json(self.path).get("id") in (self.id, None)  # not a lock a waiter made after taking ours over
        for p in ([self.status, self.path] if mine else []):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _wait(lock: Path, status: Path, final: Path, token: str | None, progress: bool, stale_s: float) -> None:
    """Until `final` is published (acceptable) or the lock is gone; an abandoned lock is removed."""
    from tqdm import tqdm

    seen, since = None, time.monotonic()
    bar = None
    try:
        while True:
            if _acceptable(final, token):
                return
            try:
                st = lock.stat()
            except FileNotFoundError:
                return
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            if sig != seen:
                seen, since = sig, time.monotonic()
            elif time.monotonic() - since > stale_s:
                who = _read_json(lock).get("builder", "?")
                log.warning("data cache: the build lock %s of %s has not moved for %.0f s; taking it over", lock, who,
                            stale_s)
                try:
                    lock.unlink()
                except FileNotFoundError:
                    pass
                return
            if progress:
                info = _read_json(status)
                if bar is None:
                    who = _read_json(lock).get("builder", "another process")
                    bar = tqdm(desc=f"data cache: waiting for {who} to build {final.name}", unit="sample",
                               total=info.get("total"))
                if info.get("total") and bar.total != info["total"]:
                    bar.total = info["total"]
                bar.n = int(info.get("done", 0))
                bar.refresh()
            time.sleep(POLL_S)
    finally:
        if bar is not None:
            bar.close()


def _write_failure(path: Path, build_id: str, err: BaseException) -> None:
    user = isinstance(err, (ValueError, FileNotFoundError))
    try:
        path.write_text(json.dumps({"builder": _me(), "id": build_id, "error": str(err) or type(err).__name__,
                                    "user_error": user}))
    except OSError:
        pass


def _publish(staging: Path, final: Path, token: str | None) -> bool:
    """Move `staging` to `final` atomically; returns False (and drops staging) when an acceptable cache
    was published meanwhile. A published cache that is not acceptable (overwrite_cache) is renamed aside."""
    if _acceptable(final, token):
        shutil.rmtree(staging, ignore_errors=True)
        return False
    if final.exists():
        aside = final.with_name(f"{final.name}.old-{time.time_ns()}")
        os.rename(final, aside)
        log.warning("data cache: replaced (overwrite_cache, or image/video files it recorded missing now exist): "
                    "the previous cache is now %s (not deleted: other runs may still read it; delete it when none "
                    "does)", aside)
    try:
        os.rename(staging, final)
    except OSError:
        if _acceptable(final, token):
            shutil.rmtree(staging, ignore_errors=True)
            return False
        raise
    return True


def get_or_build(cache_dir: Path, name: str, build: Callable[[Path, BuildLock], None], *, token: str | None = None,
                 progress: bool = True, stale_s: float | None = None) -> CacheResult:
    """The published cache `cache_dir/name`, built by `build(staging_dir, lock)` in exactly one process
    (see the module docstring). `token` (overwrite_cache) rejects caches built under another token."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / name
    lock_path, status, failed = (cache_dir / f"{name}.{ext}" for ext in ("lock", "status", "failed"))
    stale_s = STALE_S if stale_s is None else stale_s
    waited = 0.0
    while True:
        if _acceptable(final, token):
            return CacheResult(final, False, waited, read_build_info(final).get("builder", ""))
        lock = BuildLock.try_acquire(lock_path, status)
        if lock is None:
            t0 = time.monotonic()
            holder = _read_json(lock_path)
            builder = holder.get("builder")
            _wait(lock_path, status, final, token, progress, stale_s)
            waited += time.monotonic() - t0
            failure = _read_json(failed)
            if holder.get("id") and failure.get("id") == holder["id"] and not _acceptable(final, token):
                # the build we waited for failed: the same error here, not one more build per process
                cls = ValueError if failure.get("user_error") else RuntimeError
                raise cls(f"{failure.get('error')} (building the data cache {final}, by {builder})")
            continue
        try:
            if _acceptable(final, token):  # published between our look and the lock
                continue
            staging = cache_dir / f"{name}.building-{socket.gethostname()}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)  # our own leftover (the name is unique to this process)
            failed.unlink(missing_ok=True)
            try:
                build(staging, lock)
            except BaseException as e:
                shutil.rmtree(staging, ignore_errors=True)
                _write_failure(failed, lock.id, e)
                raise
            (staging / BUILD_FILE).write_text(json.dumps({"builder": _me(), "built": time.time(), "token": token}))
            lock.update(lock.progress["done"], phase="publishing")
            built = _publish(staging, final, token)
            return CacheResult(final, built, waited, read_build_info(final).get("builder", ""))
        finally:
            lock.release()
