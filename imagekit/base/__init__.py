"""Base images: a bootable, Azure-ready qcow2 per distro entry, built once and cached.

``ensure_base("debian-12")`` returns a :class:`BaseImage` whose ``path`` is a read-only qcow2. Never
write to it: put an overlay on it (``qemu-img create -f qcow2 -F qcow2 -b <path> overlay.qcow2``).

The cache key covers every input: the distro entry, the archive state (SHA-256 of each suite's InRelease,
which changes whenever the package set with its versions changes), the toolkit version, the source of
the build recipe (this package's modules) and the versions of the host tools that write the image.
With unchanged inputs the call returns at once; when the mirror cannot be reached, the newest entry
built from the same other inputs is used (with a warning).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from imagekit.base import apt, bootstrap, download
from imagekit.base import cache as cache_mod
from imagekit.base.inputs import (
    MIN_FREE_MIB,
    BaseImage,
    check_free_space,
    is_enospc,
    recipe_hash,
    static_inputs,
    tool_versions,
)
from imagekit.config.distros import Distro, SourceKind
from imagekit.core.errors import BuildError, CommandError, HostError
from imagekit.core.log import Timings, step

log = logging.getLogger(__name__)

def ensure_base(distro: Distro, *, cache: Path | None = None, rebuild: bool = False,
                min_free_mib: int = MIN_FREE_MIB) -> BaseImage:
    """Return the cached base image of ``distro``, building it if needed.

    ``cache`` is the cache root (default :func:`imagekit.core.paths.cache_dir`); images live in
    ``<cache>/base/<distro-id>/<key>/``. ``rebuild`` forces a new build even when an entry exists.
    """
    if distro.source.kind is SourceKind.DOWNLOAD:
        return download.ensure_download(distro, cache=cache, rebuild=rebuild)
    return _ensure_bootstrap(distro, cache=cache, rebuild=rebuild, min_free_mib=min_free_mib)


def _ensure_bootstrap(d: Distro, *, cache: Path | None, rebuild: bool, min_free_mib: int) -> BaseImage:
    root = cache_mod.base_root(cache)
    static = static_inputs(d)
    static_key = cache_mod.compute_key(static)
    mirrors = apt.mirrors()
    sources = apt.sources_for(d.source.suite, d.source.components, mirrors)
    try:
        fingerprint, sources = apt.archive_fingerprint(sources)
    except HostError as exc:
        for entry, meta in cache_mod.entries(root, d.id):
            if meta.get("static_key") == static_key and not rebuild:
                log.warning("%s; using the newest cached %s image built from the same inputs (%s)",
                            exc.message, d.id, meta.get("created"))
                return BaseImage.from_meta(entry, meta, cached=True)
        raise
    inputs = {**static, "archive": fingerprint}
    key = cache_mod.compute_key(inputs)
    with cache_mod.distro_lock(root, d.id) as distro_dir:
        dest = cache_mod.entry_dir(root, d.id, key)
        found = cache_mod.read_meta(dest)
        if found is not None and not rebuild:
            log.info("base image %s is cached: %s", d.id, dest / cache_mod.IMAGE_NAME)
            return BaseImage.from_meta(dest, found, cached=True)
        cache_mod.remove_stale_builds(distro_dir)
        check_free_space(distro_dir, min_free_mib)
        timings = Timings()
        try:
            with step(f"Building base image {d.id}", timings), cache_mod.build_dir(distro_dir) as tmp:
                work, out = tmp / "work", tmp / "out"
                work.mkdir()
                out.mkdir()
                facts = bootstrap.build(d, sources, work, out, timings)
                meta = {
                    "distro_id": d.id,
                    "key": key,
                    "static_key": static_key,
                    "inputs": inputs,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    **facts,
                    "timings": timings.as_dict(),
                }
                cache_mod.write_json_atomic(out / cache_mod.META_NAME, meta)
                if rebuild and dest.exists():
                    shutil.rmtree(dest)
                cache_mod.publish(out, dest)
        except (OSError, CommandError) as exc:
            if is_enospc(exc):
                raise BuildError(
                    f"no space left on the device holding {distro_dir} while building {d.id}; "
                    "nothing was added to the cache",
                    hint="free some space, or point IMAGEKIT_CACHE at a larger file system",
                ) from exc
            raise
        meta["timings"] = timings.as_dict()  # now with the total
        cache_mod.write_json_atomic(dest / cache_mod.META_NAME, meta)
        return BaseImage.from_meta(dest, meta, cached=False)



def _open_files() -> set[str]:
    """Paths any process has open (QEMU keeps a backing file open while a VM runs on an overlay)."""
    found: set[str] = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    found.add(os.readlink(fd))
        except OSError:
            continue
    return found


def prune(distro_id: str, *, cache: Path | None = None, keep: int = 1) -> list[Path]:
    """Remove all but the newest ``keep`` cached images of ``distro_id``, except any a process has open.

    Overlays made on a removed image stop working: prune only when none of them is still needed.
    """
    root = cache_mod.base_root(cache)
    removed: list[Path] = []
    with cache_mod.distro_lock(root, distro_id):
        in_use = _open_files()
        for entry, _meta in cache_mod.entries(root, distro_id)[keep:]:
            if str(entry / cache_mod.IMAGE_NAME) in in_use:
                log.info("keeping %s: in use", entry)
                continue
            shutil.rmtree(entry)
            removed.append(entry)
    return removed


__all__ = [
    "MIN_FREE_MIB",
    "BaseImage",
    "check_free_space",
    "ensure_base",
    "is_enospc",
    "prune",
    "recipe_hash",
    "static_inputs",
    "tool_versions",
]
