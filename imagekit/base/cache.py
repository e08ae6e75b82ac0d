"""The base-image cache: one directory per key, published atomically, built under a per-distro lock.

Layout under ``<cache>/base/<distro-id>/``::

    .lock                  flock(2) held while looking up or building this distro
    .build-<random>/       a build in progress: work/ (root dir, raw disk) and out/ (the result)
    <key[:20]>/            a finished entry: image.qcow2 (read-only) and meta.json

An entry appears only by ``rename(out, <key>)`` after everything in it is written and synced, so a
reader never sees a half entry. A build directory left by a killed process is removed by the next
build of that distro (under the lock, no other build can own it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from imagekit.core import fsutil
from imagekit.core.fsutil import fsync_dir
from imagekit.core.paths import cache_dir

log = logging.getLogger(__name__)

IMAGE_NAME = "image.qcow2"
META_NAME = "meta.json"
KEY_LEN = 20


def base_root(cache: Path | None = None) -> Path:
    return (cache if cache is not None else cache_dir()) / "base"


def compute_key(inputs: Mapping[str, Any]) -> str:
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def entry_dir(root: Path, distro_id: str, key: str) -> Path:
    return root / distro_id / key[:KEY_LEN]


@contextlib.contextmanager
def distro_lock(root: Path, distro_id: str) -> Iterator[Path]:
    d = root / distro_id
    d.mkdir(parents=True, exist_ok=True)
    with (d / ".lock").open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def remove_stale_builds(distro_dir: Path) -> None:
    """Remove build dirs of earlier, killed runs (call only while holding the distro lock)."""
    for p in distro_dir.glob(".build-*"):
        log.info("removing an unfinished build left behind: %s", p)
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def build_dir(distro_dir: Path) -> Iterator[Path]:
    """A fresh build directory next to the entries (same file system, so the final rename is atomic);
    always removed afterwards, whatever happened."""
    d = Path(tempfile.mkdtemp(prefix=".build-", dir=distro_dir))
    try:
        yield d
    finally:
        # After Ctrl-C, children of the build (dpkg under mmdebstrap) may still be exiting and writing
        # for a moment; try again briefly rather than leave a half tree behind.
        for attempt in range(10):
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                break
            time.sleep(0.5 * (attempt + 1))


def publish(out: Path, dest: Path) -> None:
    """Move a finished ``out`` directory to ``dest`` in one rename."""
    for f in out.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(out)
    if dest.exists():
        # Same key built twice (e.g. a cache entry removed by hand while another process read it):
        # the existing one wins.
        shutil.rmtree(out)
        return
    os.rename(out, dest)
    fsync_dir(dest.parent)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """meta.json, keys sorted so that entries compare and diff cleanly."""
    fsutil.write_json_atomic(path, data, sort_keys=True)


def read_meta(entry: Path) -> dict[str, Any] | None:
    """The meta of a complete entry, or None if ``entry`` is not one."""
    meta = entry / META_NAME
    if not (entry / IMAGE_NAME).is_file() or not meta.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data


def entries(root: Path, distro_id: str) -> list[tuple[Path, dict[str, Any]]]:
    """Complete entries of one distro, newest first."""
    d = root / distro_id
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        if p.name.startswith("."):
            continue
        meta = read_meta(p)
        if meta is not None:
            found.append((p, meta))
    found.sort(key=lambda pm: str(pm[1].get("created", "")), reverse=True)
    return found
