"""Vendor cloud images: download (resumable), verify against the vendor's checksum file, decompress,
convert to qcow2, and configure the agent from the table.

The verified download is cached by its checksum (``<cache>/downloads/<algorithm>-<digest>/<name>``), so
two entries that point at the same file share it and a changed file upstream is a new download. A
partial download lives in ``<cache>/downloads/.partial/`` and is resumed with an HTTP Range request
(also within one run, when the server drops the connection). Nothing reaches the by-checksum cache or
the base-image cache before the digest matches.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import http.client
import json
import logging
import lzma
import os
import pickle
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlparse

from imagekit.base import cache as cache_mod
from imagekit.base import disk
from imagekit.base.bootstrap import PRIVATE_NAMESPACES
from imagekit.base.inputs import BaseImage, check_free_space, is_enospc, static_inputs
from imagekit.config.distros import Compression, Distro, ImageFormat
from imagekit.core.errors import BuildError, HostError
from imagekit.core.log import Timings, step
from imagekit.core.paths import REPO_ROOT, cache_dir
from imagekit.core.run import run

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RETRIES = 5
TIMEOUT_S = 60.0
QEMU_FORMAT = {ImageFormat.QCOW2: "qcow2", ImageFormat.RAW: "raw", ImageFormat.VHD: "vpc",
               ImageFormat.VMDK: "vmdk"}
_LINUX_TYPES = ("83", "0fc63daf-8483-4772-8e79-3d69d8477de4", "4f68bce3-e8cd-4db1-96e7-fbcaf984b709")


class DownloadError(BuildError):
    """A download failed, or what arrived is not what the vendor published."""


# --- checksum files ---------------------------------------------------------------------------------

_GNU = re.compile(r"^(?P<digest>[0-9a-fA-F]{32,128})\s+[ *]?(?P<name>\S.*?)\s*$")
_BSD = re.compile(r"^(?P<alg>[A-Za-z0-9-]+)\s*\((?P<name>.+)\)\s*=\s*(?P<digest>[0-9a-fA-F]{32,128})\s*$")
_DIGEST_LEN = {"sha256": 64, "sha512": 128}


def parse_checksums(text: str, algorithm: str) -> dict[str, str]:
    """File name (base name) → lower-case hex digest, from GNU (``digest  name``, ``digest *name``) or BSD
    (``SHA256 (name) = digest``) lines; other lines (PGP armour, comments) are ignored."""
    want = _DIGEST_LEN[algorithm]
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = _BSD.match(line)
        if m and m["alg"].replace("-", "").lower() == algorithm and len(m["digest"]) == want:
            out[PurePosixPath(m["name"].strip()).name] = m["digest"].lower()
            continue
        m = _GNU.match(line)
        if m and len(m["digest"]) == want:
            out[PurePosixPath(m["name"].lstrip("*").strip()).name] = m["digest"].lower()
            continue
        if re.fullmatch(r"[0-9a-fA-F]+", line) and len(line) == want:
            out[""] = line.lower()  # a bare digest: a checksum file for one image
    return out


def expected_digest(checksum_text: str, image_url: str, algorithm: str, checksum_url: str = "") -> str:
    name = PurePosixPath(urlparse(image_url).path).name
    sums = parse_checksums(checksum_text, algorithm)
    if name in sums:
        return sums[name]
    if set(sums) == {""}:
        return sums[""]
    listed = ", ".join(sorted(n for n in sums if n)) or "none"
    raise DownloadError(f"the checksum file {checksum_url or ''} has no {algorithm} entry for {name!r}; "
                        f"it lists: {listed}")


# --- HTTP -------------------------------------------------------------------------------------------


def _open(url: str, start: int = 0) -> http.client.HTTPResponse:
    req = urllib.request.Request(url, headers={"User-Agent": "imagekit", "Accept-Encoding": "identity"})
    if start:
        req.add_header("Range", f"bytes={start}-")
    try:
        resp: http.client.HTTPResponse = urllib.request.urlopen(req, timeout=TIMEOUT_S)
        return resp
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            raise  # the caller decides: the partial file may already be complete
        raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from exc


def fetch_text(url: str, limit: int = 16 << 20) -> str:
    with _open(url) as resp:
        return resp.read(limit).decode(errors="replace")


def _progress(total: int | None, initial: int, desc: str) -> Any:
    """A tqdm bar on a terminal; nothing otherwise (logs stay clean)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                file=sys.stderr)


def download_resumable(url: str, part: Path, *, retries: int = RETRIES,
                       sleep: Callable[[float], None] = time.sleep) -> None:
    """Append to ``part`` until the server has sent everything; resume with Range after a drop."""
    attempt = 0
    while True:
        start = part.stat().st_size if part.exists() else 0
        try:
            resp = _open(url, start)
        except urllib.error.HTTPError as exc:  # 416: nothing left to send
            log.info("server says %s is complete (%s)", part.name, exc.code)
            return
        with resp:
            if start and resp.status != 206:
                log.info("server ignored the Range request; downloading %s from the start", url)
                start = 0
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else None
            bar = _progress(total, start, PurePosixPath(urlparse(url).path).name)
            mode = "ab" if start else "wb"
            got = 0
            try:
                with part.open(mode) as f:
                    while True:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        f.write(chunk)
                        got += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                complete = total is None or start + got >= total
                if complete:
                    return
                raise http.client.IncompleteRead(b"", (total or 0) - start - got)
            except (http.client.IncompleteRead, ConnectionError, TimeoutError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno == 28:
                    raise
                attempt += 1
                if attempt > retries:
                    raise DownloadError(f"download of {url} kept failing after {retries} resumes: {exc}") from exc
                log.warning("download of %s interrupted at %d bytes (%s); resuming", url,
                            part.stat().st_size, exc)
                sleep(min(2.0 * attempt, 10.0))
            finally:
                if bar is not None:
                    bar.close()


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class VerifiedFile:
    path: Path
    algorithm: str
    digest: str
    downloaded: bool


def fetch_verified(url: str, algorithm: str, digest: str, downloads: Path) -> VerifiedFile:
    """The file at ``url`` with the given digest, from the by-checksum cache or downloaded and checked."""
    name = PurePosixPath(urlparse(url).path).name or "image"
    final_dir = downloads / f"{algorithm}-{digest}"
    final = final_dir / name
    if final.is_file():
        return VerifiedFile(final, algorithm, digest, False)
    partial = downloads / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    part = partial / f"{algorithm}-{digest}.part"
    download_resumable(url, part)
    got = file_digest(part, algorithm)
    if got != digest:
        part.unlink()
        raise DownloadError(
            f"checksum mismatch for {url}: the vendor's checksum file says {algorithm} {digest}, the "
            f"download has {got}; refusing to use it (the partial file was removed)")
    tmp_dir = downloads / f".{algorithm}-{digest}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    os.rename(part, tmp_dir / name)
    os.rename(tmp_dir, final_dir)
    return VerifiedFile(final, algorithm, digest, True)


# --- decompression, conversion ------------------------------------------------------------------------


def _copy(src: IO[bytes], dst: IO[bytes]) -> None:
    shutil.copyfileobj(src, dst, CHUNK)


def decompress(src: Path, dst: Path, compression: Compression) -> None:
    """Decompress ``src`` into ``dst`` (a plain copy for ``none``), keeping ``dst`` sparse-friendly."""
    if compression is Compression.NONE:
        shutil.copyfile(src, dst)
        return
    if compression is Compression.ZST:
        run(["zstd", "-q", "-d", "-f", str(src), "-o", str(dst)])
        return
    module: Any = {Compression.GZ: gzip, Compression.XZ: lzma, Compression.BZ2: bz2}[compression]
    try:
        with module.open(src, "rb") as fin, dst.open("wb") as fout:
            _copy(fin, fout)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        if isinstance(exc, OSError) and exc.errno == 28:
            raise
        raise DownloadError(f"{src.name} is not valid {compression.value} data: {exc}") from exc


def root_partition(raw: Path) -> disk.Partition:
    parts = [p for p in disk.partitions(raw) if p.type.lower() in _LINUX_TYPES]
    if not parts:
        raise BuildError(f"no Linux root partition in the downloaded image ({raw.name})")
    return max(parts, key=lambda p: p.size_sectors)


# --- the entry point --------------------------------------------------------------------------------


def ensure_download(distro: Distro, *, cache: Path | None = None, rebuild: bool = False) -> BaseImage:
    """The base image of a download entry: cached by a key over the entry, the vendor's digest for the
    image, the recipe and the toolkit version."""

    src = distro.source
    if src.credentials:
        raise HostError(f"{distro.id}: downloading needs {src.credentials}")
    root = cache_mod.base_root(cache)
    downloads = (cache if cache is not None else cache_dir()) / "downloads"
    static = static_inputs(distro)
    static_key = cache_mod.compute_key(static)
    try:
        digest = expected_digest(fetch_text(src.checksum_url), src.url, src.checksum_algorithm, src.checksum_url)
    except DownloadError as exc:
        for entry, meta in cache_mod.entries(root, distro.id):
            if meta.get("static_key") == static_key and not rebuild:
                log.warning("%s; using the newest cached %s image (%s)", exc.message, distro.id,
                            meta.get("created"))
                return BaseImage.from_meta(entry, meta, cached=True)
        raise
    inputs = {**static, "image": {"url": src.url, src.checksum_algorithm: digest}}
    key = cache_mod.compute_key(inputs)
    with cache_mod.distro_lock(root, distro.id) as distro_dir:
        dest = cache_mod.entry_dir(root, distro.id, key)
        found = cache_mod.read_meta(dest)
        if found is not None and not rebuild:
            return BaseImage.from_meta(dest, found, cached=True)
        cache_mod.remove_stale_builds(distro_dir)
        timings = Timings()
        try:
            with step(f"Building base image {distro.id} from the vendor image", timings):
                with step(f"Downloading and verifying {PurePosixPath(urlparse(src.url).path).name}", timings):
                    downloads.mkdir(parents=True, exist_ok=True)
                    got = fetch_verified(src.url, src.checksum_algorithm, digest, downloads)
                check_free_space(distro_dir, 2 * (got.path.stat().st_size >> 20) + 1024)
                with cache_mod.build_dir(distro_dir) as tmp:
                    work, out = tmp / "work", tmp / "out"
                    work.mkdir()
                    out.mkdir()
                    facts = _prepare(distro, got.path, work, out, timings)
                    meta = {"distro_id": distro.id, "key": key, "static_key": static_key, "inputs": inputs,
                            "created": datetime.now(UTC).isoformat(timespec="seconds"), "source": "download",
                            "download": {"url": src.url, "path": str(got.path), src.checksum_algorithm: digest},
                            **facts, "timings": timings.as_dict()}
                    cache_mod.write_json_atomic(out / cache_mod.META_NAME, meta)
                    if rebuild and dest.exists():
                        shutil.rmtree(dest)
                    cache_mod.publish(out, dest)
        except (OSError, BuildError) as exc:
            cause = exc.__cause__ if isinstance(exc, BuildError) else exc
            if is_enospc(exc) or (cause is not None and is_enospc(cause)):
                raise BuildError(f"no space left on the device holding {distro_dir} while preparing {distro.id}; "
                                 "nothing was added to the cache",
                                 hint="free some space, or point IMAGEKIT_CACHE at a larger file system") from exc
            raise
        return BaseImage.from_meta(dest, meta, cached=False)


def _prepare(distro: Distro, original: Path, work: Path, out: Path, timings: Timings) -> dict[str, Any]:

    src = distro.source
    unpacked = work / "image.orig"
    raw = work / "disk.raw"
    with step(f"Unpacking ({src.compression.value}) and converting {src.format.value} to raw", timings):
        decompress(original, unpacked, src.compression)
        info = run(["qemu-img", "info", "--output=json", "-f", QEMU_FORMAT[src.format], str(unpacked)],
                   check=False)
        if info.returncode != 0:
            why = info.stderr.strip().splitlines()[-1] if info.stderr.strip() else f"exit {info.returncode}"
            raise DownloadError(f"the downloaded file is not a {src.format.value} image: {why}")
        run(["qemu-img", "convert", "-f", QEMU_FORMAT[src.format], "-O", "raw", str(unpacked), str(raw)])
        unpacked.unlink()
        size = raw.stat().st_size
        target = max(distro.disk_size_mib * disk.MIB, -(-size // disk.MIB) * disk.MIB)
        if target != size:
            with raw.open("r+b") as f:
                f.truncate(target)
    part = root_partition(raw)
    with step(f"Configuring {distro.agent.value} in the image (offline)", timings):
        facts = configure_offline(raw, part.offset, part.size_sectors * disk.SECTOR, distro)
    with step("Converting to qcow2", timings):
        image = out / cache_mod.IMAGE_NAME
        disk.to_qcow2(raw, image)
        os.chmod(image, 0o444)
    return {
        "kernel": facts.get("kernel", ""),
        "packages": facts.get("packages", {}),
        "installed_agent_packages": facts.get("installed", []),
        "root_uuid": _fs_uuid(raw, part),
        "partition_start_sector": part.start_sector,
        "disk_size_mib": target // disk.MIB,
        "kernel_cmdline": "",  # the vendor's boot configuration is kept as shipped
    }


def configure_offline(raw: Path, offset: int, sizelimit: int, distro: Distro) -> dict[str, Any]:
    """Configure the root file system at ``offset`` of ``raw`` in private namespaces
    (``python -m imagekit.base.offline``, which no module imports); return facts (packages, kernel)."""
    # The entry travels pickled: it may be a modified copy that no file on disk describes.
    request = {"raw": str(raw), "offset": offset, "sizelimit": sizelimit,
               "distro": base64.b64encode(pickle.dumps(distro)).decode()}
    res = run([*PRIVATE_NAMESPACES, sys.executable, "-m", "imagekit.base.offline"],
              input=json.dumps(request), cwd=REPO_ROOT, check=False)
    lines = res.stdout.strip().splitlines()
    try:
        reply: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        reply = {}
    if res.returncode != 0 or "error" in reply or not reply:
        detail = reply.get("error") or "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise BuildError(f"configuring {distro.id} inside the downloaded image failed: {detail}")
    return reply


def _fs_uuid(raw: Path, part: disk.Partition) -> str:
    res = run(["blkid", "-p", "-O", str(part.offset), "-s", "UUID", "-o", "value", str(raw)], check=False)
    return res.stdout.strip()
