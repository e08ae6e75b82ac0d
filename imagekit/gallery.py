"""The local gallery: ``images/<distro>/<version>/`` with the artifacts and ``manifest.json``.

Crash safety is by construction:

* A version is built in a staging directory under the gallery root (same filesystem), every file fsynced,
  then published with one ``rename`` of the directory — the commit point. A crash or Ctrl-C before it
  leaves only a staging directory (never listed, removed by the next write); after it, a complete version.
* Removal is the mirror image: one ``rename`` of the version directory into a trash directory, then the
  deletion.
* ``images/index.json`` records what directories cannot: registration time, deprecation (end-of-life date,
  excluded from latest) and removed versions (a version number is never reused). It is replaced atomically
  (temp file, fsync, rename) under a lock file, so it always parses. Should a crash fall between a rename and
  the index write, readers reconcile: a published directory not in the index is listed (its manifest says
  when it was registered), an indexed version whose directory is gone counts as removed.

Concurrency: writers take ``images/.lock`` (flock; released by the kernel if the process dies). Each
staging directory holds its own flock while its build runs, so clean-up never removes a live build's files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from imagekit.capture import MANIFEST_NAME
from imagekit.core.errors import BuildError, InputError
from imagekit.core.fsutil import fsync_dir, write_json_atomic
from imagekit.core.paths import IMAGES_DIR
from imagekit.core.versions import Version, default_version

INDEX_NAME = "index.json"
INDEX_FORMAT = 1
_STAGING_PREFIX = ".staging-"
_TRASH_PREFIX = ".trash-"
_OWNER_LOCK = ".owner.lock"
_DISTRO_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")


class Status(StrEnum):
    ACTIVE = "active"
    DEPRECATED = "deprecated"  # excluded from latest, end of life not reached yet
    END_OF_LIFE = "end-of-life"
    REMOVED = "removed"


@dataclass(frozen=True)
class ImageVersion:
    """One version of one distro's image, as the gallery lists it."""

    distro: str
    version: Version
    path: Path
    registered_at: str
    exclude_from_latest: bool = False
    end_of_life: dt.date | None = None
    removed_at: str | None = None
    # where ``invoke publish`` put it (see Gallery.record_publication); dicts, so left out of hash and ==
    published: tuple[dict[str, Any], ...] = field(default=(), hash=False, compare=False)

    def status(self, today: dt.date | None = None) -> Status:
        day = today or dt.datetime.now(dt.UTC).date()
        if self.removed_at:
            return Status.REMOVED
        if self.end_of_life is not None and self.end_of_life <= day:
            return Status.END_OF_LIFE
        if self.exclude_from_latest:
            return Status.DEPRECATED
        return Status.ACTIVE

    def eligible_for_latest(self, today: dt.date | None = None) -> bool:
        return self.status(today) is Status.ACTIVE

    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / MANIFEST_NAME).read_text())
        return data

    def as_dict(self, today: dt.date | None = None) -> dict[str, Any]:
        return {
            "distro": self.distro, "version": str(self.version), "status": self.status(today).value,
            "registered_at": self.registered_at, "exclude_from_latest": self.exclude_from_latest,
            "end_of_life": self.end_of_life.isoformat() if self.end_of_life else None,
            "removed_at": self.removed_at, "path": str(self.path), "published": [dict(p) for p in self.published],
        }


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _check_distro(distro: str) -> None:
    if not _DISTRO_RE.match(distro):
        raise InputError(f"bad distro id {distro!r}; allowed: lower-case letters, digits, '.' and '-'")


_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
EOL_ALLOWED = "a date as YYYY-MM-DD (e.g. 2027-06-30) after today (UTC); Azure refuses an end of life in the past"


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def parse_end_of_life(text: str, today: dt.date | None = None) -> dt.date:
    """Parse a user-given end-of-life date: exactly ``YYYY-MM-DD`` (not ``20261231`` or ``2026-W53-4``, which
    ``date.fromisoformat`` also takes), a real calendar date, after ``today`` (UTC)."""
    shown = repr(text[:40]) + ("..." if len(text) > 40 else "")
    if not _DATE_RE.match(text):
        raise InputError(f"bad end-of-life date {shown}", hint=f"allowed: {EOL_ALLOWED}")
    try:
        eol = dt.date.fromisoformat(text)
    except ValueError:
        raise InputError(f"bad end-of-life date {shown}: no such day", hint=f"allowed: {EOL_ALLOWED}") from None
    _check_future(eol, today)
    return eol


def _check_future(eol: dt.date, today: dt.date | None) -> None:
    day = today or _today()
    if eol <= day:
        raise InputError(f"end-of-life date {eol.isoformat()} is not after today ({day.isoformat()}, UTC)",
                         hint=f"allowed: {EOL_ALLOWED}")


class Staging:
    """A private directory under the gallery root where one build writes its artifacts."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self.published = False


def default_root() -> Path:
    """``$IMAGEKIT_IMAGES`` if set, else the repository's ``images/``."""
    env = os.environ.get("IMAGEKIT_IMAGES")
    return Path(env) if env else IMAGES_DIR


class Gallery:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else default_root()

    # -- locking and clean-up ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._collect_garbage()
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _collect_garbage(self) -> None:
        """Remove trash and the staging directories of builds that no longer run (caller holds the lock)."""
        for p in self.root.iterdir():
            if p.name.startswith(_TRASH_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(_STAGING_PREFIX) and p.is_dir():
                try:
                    fd = os.open(p / _OWNER_LOCK, os.O_RDWR)
                except FileNotFoundError:
                    # killed between mkdir and creating the lock, or just before the publishing rename
                    shutil.rmtree(p, ignore_errors=True)
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live build owns it
                finally:
                    os.close(fd)
                shutil.rmtree(p, ignore_errors=True)

    # -- reading -----------------------------------------------------------------------------------

    def _read_index(self) -> dict[str, Any]:
        path = self.root / INDEX_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {"format": INDEX_FORMAT, "distros": {}}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BuildError(f"{path}: unreadable gallery index ({exc}); it is only ever replaced atomically, "
                             "so something outside imagekit changed it") from exc
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise BuildError(f"{path}: unknown index format {data.get('format') if isinstance(data, dict) else data!r}")
        return data

    def _scan(self) -> dict[str, dict[Version, Path]]:
        """Published version directories: ``<distro>/<version>/manifest.json`` with a valid version name."""
        found: dict[str, dict[Version, Path]] = {}
        if not self.root.is_dir():
            return found
        for d in self.root.iterdir():
            if d.name.startswith(".") or not d.is_dir() or not _DISTRO_RE.match(d.name):
                continue
            for v in d.iterdir():
                if v.name.startswith(".") or not (v / MANIFEST_NAME).is_file():
                    continue
                try:
                    ver = Version.parse(v.name)
                except InputError:
                    continue
                found.setdefault(d.name, {})[ver] = v
        return found

    def _state(self) -> dict[str, Any]:
        """The index reconciled with the directories (see the module docstring)."""
        index = self._read_index()
        distros: dict[str, Any] = index.setdefault("distros", {})
        on_disk = self._scan()
        for distro, versions in on_disk.items():
            entries = distros.setdefault(distro, {})
            for ver, path in versions.items():
                entry = entries.get(str(ver))
                if entry is None or entry.get("removed_at"):
                    try:
                        registered = json.loads((path / MANIFEST_NAME).read_text()).get("registered_at") or _now()
                    except (OSError, json.JSONDecodeError):
                        registered = _now()
                    entries[str(ver)] = {"registered_at": registered, "exclude_from_latest": False,
                                         "end_of_life": None, "removed_at": None}
        for distro, entries in distros.items():
            for ver_text, entry in entries.items():
                if entry.get("removed_at"):
                    continue
                try:
                    ver = Version.parse(ver_text)
                except InputError:
                    continue
                if ver not in on_disk.get(distro, {}):
                    entry["removed_at"] = entry.get("registered_at") or _now()
        return index

    def _versions_from(self, state: dict[str, Any], distro: str | None) -> list[ImageVersion]:
        out: list[ImageVersion] = []
        for d, entries in sorted(state.get("distros", {}).items()):
            if distro is not None and d != distro:
                continue
            for ver_text, e in entries.items():
                try:
                    ver = Version.parse(ver_text)
                except InputError:
                    continue
                eol = dt.date.fromisoformat(e["end_of_life"]) if e.get("end_of_life") else None
                out.append(ImageVersion(
                    distro=d, version=ver, path=self.root / d / str(ver), registered_at=e.get("registered_at", ""),
                    exclude_from_latest=bool(e.get("exclude_from_latest")), end_of_life=eol,
                    removed_at=e.get("removed_at"),
                    published=tuple(p for p in e.get("published", []) if isinstance(p, dict)),
                ))
        out.sort(key=lambda iv: (iv.distro, tuple(-x for x in (iv.version.major, iv.version.minor,
                                                               iv.version.patch))))
        return out

    def versions(self, distro: str | None = None, *, include_removed: bool = False) -> list[ImageVersion]:
        """Versions per distro, latest first; removed ones only when asked."""
        if distro is not None:
            _check_distro(distro)
        versions = self._versions_from(self._state(), distro)
        return [v for v in versions if include_removed or v.removed_at is None]

    def get(self, distro: str, version: Version | str) -> ImageVersion:
        ver = Version.parse(version) if isinstance(version, str) else version
        for iv in self.versions(distro):
            if iv.version == ver:
                return iv
        known = ", ".join(str(v.version) for v in self.versions(distro)) or "none"
        raise InputError(f"{distro} has no image version {ver}; registered: {known}")

    def latest(self, distro: str, today: dt.date | None = None) -> ImageVersion:
        """Resolve "latest" as Azure does: the highest version not excluded from latest (and, here, not
        past its end-of-life date)."""
        versions = self.versions(distro)
        for iv in versions:  # already highest first
            if iv.eligible_for_latest(today):
                return iv
        if not versions:
            raise InputError(f"no image versions of {distro} are registered; run: invoke build --distro {distro}")
        raise InputError(f"every version of {distro} is deprecated or past end of life; none resolves as latest")

    # -- writing -----------------------------------------------------------------------------------

    def _write_index(self, state: dict[str, Any]) -> None:
        state["format"] = INDEX_FORMAT
        state["updated_at"] = _now()
        write_json_atomic(self.root / INDEX_NAME, state)
        fsync_dir(self.root)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Staging]:
        """A staging directory for one build; removed on exit unless :meth:`register` published it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{_STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        path.mkdir()
        fd = os.open(path / _OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = Staging(path, fd)
        try:
            yield st
        finally:
            os.close(fd)
            if not st.published:
                shutil.rmtree(path, ignore_errors=True)

    def reserve_check(self, distro: str, version: Version) -> None:
        """Fail early when ``version`` is taken (``register`` checks again under the lock)."""
        for iv in self.versions(distro, include_removed=True):
            if iv.version == version:
                raise InputError(_taken_message(iv))

    def register(self, distro: str, staging: Staging, manifest: dict[str, Any],
                 version: Version | None = None, *, distro_version: str = "") -> ImageVersion:
        """Publish the staged artifacts plus ``manifest`` as ``distro``/``version`` (the default scheme
        when ``version`` is None). Registered versions are immutable: a taken number is refused."""
        _check_distro(distro)
        for a in manifest.get("artifacts", []):
            if not (staging.path / a["name"]).is_file():
                raise BuildError(f"cannot register {distro}: artifact {a['name']} is missing from {staging.path}")
        with self._locked():
            state = self._state()
            entries: dict[str, Any] = state.setdefault("distros", {}).setdefault(distro, {})
            taken = [Version.parse(v) for v in entries]
            if version is None:
                version = default_version(distro_version or manifest.get("distro_version", ""), taken)
            elif str(version) in entries:
                raise InputError(_taken_message(self._versions_from(
                    {"distros": {distro: {str(version): entries[str(version)]}}}, distro)[0]))
            registered_at = _now()
            final = dict(manifest, distro=distro, version=str(version), registered_at=registered_at)
            write_json_atomic(staging.path / MANIFEST_NAME, final)
            (staging.path / _OWNER_LOCK).unlink()
            for f in staging.path.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    f.chmod(0o444)  # immutable by intent: nothing rewrites a registered artifact in place
            fsync_dir(staging.path)
            target_dir = self.root / distro
            target_dir.mkdir(exist_ok=True)
            target = target_dir / str(version)
            if target.exists():  # a directory the index did not know of; never overwrite it
                raise InputError(f"{target} already exists; image versions are immutable")
            os.rename(staging.path, target)
            staging.published = True
            fsync_dir(target_dir)
            fsync_dir(self.root)
            entries[str(version)] = {"registered_at": registered_at, "exclude_from_latest": False,
                                     "end_of_life": None, "removed_at": None}
            self._write_index(state)
        return self.get(distro, version)

    def deprecate(self, distro: str, version: Version | str, end_of_life: dt.date,
                  *, exclude_from_latest: bool = True, today: dt.date | None = None) -> ImageVersion:
        """Set an end-of-life date; by default the version is also excluded from "latest" right away.

        As in Azure, the date must be in the future: after ``today`` (default: today, UTC)."""
        _check_future(end_of_life, today)
        iv = self.get(distro, version)
        with self._locked():
            state = self._state()
            entry = state["distros"][distro][str(iv.version)]
            if entry.get("removed_at"):
                raise InputError(f"{distro} {iv.version} was removed")
            entry["end_of_life"] = end_of_life.isoformat()
            entry["exclude_from_latest"] = exclude_from_latest
            self._write_index(state)
        return self.get(distro, iv.version)

    def record_publication(self, distro: str, version: Version | str, record: dict[str, Any]) -> ImageVersion:
        """Record where a version was published (blob URL, gallery version id, regions, state, time). A record
        for the same ``key`` (the blob URL and the gallery version id) replaces the earlier one, so publishing
        again does not pile up entries; so does a gallery version's record replace its blob's upload-only one."""
        iv = self.get(distro, version)
        key = record.get("key")

        def superseded(p: dict[str, Any]) -> bool:
            return p.get("key") == key or (bool(record.get("gallery_version_id")) and not p.get("gallery_version_id")
                                           and p.get("blob_url") == record.get("blob_url"))

        with self._locked():
            state = self._state()
            entry = state["distros"][distro][str(iv.version)]
            if entry.get("removed_at"):
                raise InputError(f"{distro} {iv.version} was removed")
            records = [p for p in entry.get("published", []) if isinstance(p, dict) and not superseded(p)]
            records.append(dict(record))
            entry["published"] = records
            self._write_index(state)
        return self.get(distro, iv.version)

    def remove(self, distro: str, version: Version | str) -> None:
        """Delete a version's files; the number stays taken (listed as removed with --all)."""
        iv = self.get(distro, version)
        with self._locked():
            state = self._state()
            trash = self.root / f"{_TRASH_PREFIX}{distro}-{iv.version}-{secrets.token_hex(4)}"
            os.rename(iv.path, trash)
            fsync_dir(iv.path.parent)
            state["distros"][distro][str(iv.version)]["removed_at"] = _now()
            self._write_index(state)
            shutil.rmtree(trash, ignore_errors=True)
            with contextlib.suppress(OSError):
                iv.path.parent.rmdir()  # only when it was the distro's last version


def _taken_message(iv: ImageVersion) -> str:
    if iv.removed_at:
        return (f"{iv.distro} {iv.version} was registered and later removed; version numbers are never "
                "reused — pick a higher one")
    return f"{iv.distro} {iv.version} is already registered; registered versions are immutable — pick another"
