"""What a base image is made from and what it is: the cache key's inputs (the distro entry, the toolkit,
the recipe's own source, the host tools) and the :class:`BaseImage` record, shared by the bootstrap and
the download paths."""

from __future__ import annotations

import errno
import functools
import hashlib
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagekit
from imagekit.base import cache as cache_mod
from imagekit.config.distros import Distro, SourceKind
from imagekit.core.errors import BuildError, CommandError, HostError
from imagekit.core.run import run

# Modules whose code decides the bytes of a bootstrapped image: part of the cache key.
_RECIPE_FILES = ("apt.py", "bootstrap.py", "customize.py", "disk.py")
_DOWNLOAD_RECIPE_FILES = ("download.py", "offline.py", "customize.py", "disk.py")
# A bootstrap needs the root tree (~0.5-1 GiB), the disk's data (the same again) and the qcow2.
MIN_FREE_MIB = 3 * 1024


@dataclass(frozen=True)
class BaseImage:
    """A cached base image. ``path`` is read-only: create overlays on it, never modify it."""

    distro_id: str
    key: str
    path: Path
    meta: Path
    packages: Mapping[str, str]
    kernel: str
    source: str  # "bootstrap" or "download"
    root_uuid: str
    kernel_cmdline: str
    disk_size_mib: int
    created: str
    timings: Mapping[str, float] = field(default_factory=dict)
    cached: bool = False  # True when this call found it in the cache

    @classmethod
    def from_meta(cls, entry: Path, meta: Mapping[str, Any], *, cached: bool) -> BaseImage:
        return cls(
            distro_id=str(meta["distro_id"]),
            key=str(meta["key"]),
            path=entry / cache_mod.IMAGE_NAME,
            meta=entry / cache_mod.META_NAME,
            packages=dict(meta.get("packages", {})),
            kernel=str(meta.get("kernel", "")),
            source=str(meta.get("source", "")),
            root_uuid=str(meta.get("root_uuid", "")),
            kernel_cmdline=str(meta.get("kernel_cmdline", "")),
            disk_size_mib=int(meta.get("disk_size_mib", 0)),
            created=str(meta.get("created", "")),
            timings=dict(meta.get("timings", {})),
            cached=cached,
        )


@functools.cache
def recipe_hash(files: tuple[str, ...] = _RECIPE_FILES) -> str:
    """Hash of the recipe's source, read once per process: the key must describe the code that runs,
    not a file edited after it was imported."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in files:
        h.update(name.encode() + b"\0" + (here / name).read_bytes() + b"\0")
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            res = run(argv, check=False)
        except HostError:
            return "absent"
        text = (res.stdout or res.stderr).strip()
        return text.splitlines()[0] if text else ""

    return {
        "mmdebstrap": first_line(["mmdebstrap", "--version"]),
        "mke2fs": first_line(["mke2fs", "-V"]),
        "qemu-img": first_line(["qemu-img", "--version"]),
    }


def static_inputs(distro: Distro) -> dict[str, Any]:
    """Every input except the archive state."""
    bootstrap = distro.source.kind is SourceKind.BOOTSTRAP
    return {
        "distro": distro.as_dict(),
        "toolkit": imagekit.__version__,
        "recipe": recipe_hash(_RECIPE_FILES if bootstrap else _DOWNLOAD_RECIPE_FILES),
        "tools": tool_versions(),
    }


def check_free_space(path: Path, need_mib: int) -> None:
    free = shutil.disk_usage(path).free // (1024 * 1024)
    if free < need_mib:
        raise BuildError(
            f"not enough free space for a base image build in {path}: {free} MiB free, need about "
            f"{need_mib} MiB",
            hint="free some space, or point IMAGEKIT_CACHE at a larger file system",
        )


def is_enospc(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if isinstance(exc, CommandError):
        text = (exc.stderr + exc.stdout).lower()
        return any(m in text for m in ("no space left", "could not allocate block", "enough free space",
                                       "file system full", "disk full"))
    return False
