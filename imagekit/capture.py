"""Capture a deprovisioned disk as the artifacts a gallery version holds.

Two artifacts come out of one source disk (any format qemu-img reads, an overlay with a backing file
included):

* ``disk.vhd`` — a **fixed** VHD as Azure accepts it: raw data followed by a 512-byte footer, the virtual
  size a whole number of MiB (rounded up when the source is not), written with ``force_size`` so the
  footer holds the exact size rather than a CHS-rounded one. We do not trust the converter: the footer is
  read back and parsed here (cookie ``conectix``, disk type 2 = fixed, current size, checksum) and the
  file length must be that size plus 512 (Azure's upload gates, image-standards.md §1).
* ``disk.qcow2`` — a zstd-compressed qcow2 for local use.

Everything stays sparse: qemu-img skips zero areas when writing, the fixed VHD keeps its holes on the host
filesystem, and hashing reads only the data extents (holes are fed to SHA-256 from a zero buffer), so a
30 GiB disk with 1–2 GiB in use costs seconds and about that much host space.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagekit.core.errors import BuildError
from imagekit.core.log import Timings, step
from imagekit.core.run import require, run

MiB = 1 << 20
GiB = 1 << 30
VHD_FOOTER_SIZE = 512
VHD_COOKIE = b"conectix"
VHD_TYPE_FIXED = 2
VHD_TYPE_NAMES = {0: "none", 2: "fixed", 3: "dynamic", 4: "differencing"}
# Azure: an OS or data disk VHD of at most 1,023 GB and at least 20 MB (image-standards.md §1).
AZURE_MAX_VHD_SIZE = 1023 * GiB
AZURE_MIN_VHD_SIZE = 20 * MiB

VHD_NAME = "disk.vhd"
QCOW2_NAME = "disk.qcow2"
MANIFEST_NAME = "manifest.json"

# hard disk footer, all fields big-endian (Microsoft "Virtual Hard Disk Image Format Specification")
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
assert _FOOTER.size == VHD_FOOTER_SIZE


@dataclass(frozen=True)
class VhdFooter:
    """The parsed hard-disk footer of a VHD file."""

    cookie: bytes
    features: int
    format_version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum: int
    computed_checksum: int
    unique_id: bytes
    saved_state: int

    @property
    def disk_type_name(self) -> str:
        return VHD_TYPE_NAMES.get(self.disk_type, f"unknown ({self.disk_type})")

    def as_dict(self) -> dict[str, Any]:
        return {
            "cookie": self.cookie.decode("latin-1"),
            "disk_type": self.disk_type_name,
            "current_size": self.current_size,
            "original_size": self.original_size,
            "creator_app": self.creator_app.decode("latin-1"),
            "checksum": f"0x{self.checksum:08x}",
            "unique_id": self.unique_id.hex(),
        }


def vhd_checksum(footer: bytes) -> int:
    """The footer checksum: ones' complement of the byte sum with the checksum field taken as zero."""
    if len(footer) != VHD_FOOTER_SIZE:
        raise ValueError(f"a VHD footer is {VHD_FOOTER_SIZE} bytes, got {len(footer)}")
    total = sum(footer[:64]) + sum(footer[68:])
    return (~total) & 0xFFFFFFFF


def parse_vhd_footer(raw: bytes) -> VhdFooter:
    """Parse 512 footer bytes (no validation beyond the length; see :func:`verify_azure_vhd`)."""
    if len(raw) != VHD_FOOTER_SIZE:
        raise BuildError(f"VHD footer must be {VHD_FOOTER_SIZE} bytes, got {len(raw)}")
    f = _FOOTER.unpack(raw)
    return VhdFooter(
        cookie=f[0], features=f[1], format_version=f[2], data_offset=f[3], timestamp=f[4],
        creator_app=f[5], creator_version=f[6], creator_os=f[7], original_size=f[8], current_size=f[9],
        cylinders=f[10], heads=f[11], sectors_per_track=f[12], disk_type=f[13], checksum=f[14],
        computed_checksum=vhd_checksum(raw), unique_id=f[15], saved_state=f[16],
    )


def read_vhd_footer(path: Path) -> VhdFooter:
    """Read and parse the last 512 bytes of ``path``."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        length = fh.tell()
        if length < VHD_FOOTER_SIZE:
            raise BuildError(f"{path}: {length} bytes, too short to hold a VHD footer ({VHD_FOOTER_SIZE} bytes)")
        fh.seek(length - VHD_FOOTER_SIZE)
        return parse_vhd_footer(fh.read(VHD_FOOTER_SIZE))


def verify_azure_vhd(path: Path, expected_size: int | None = None) -> VhdFooter:
    """Check every gate Azure applies to an uploaded VHD, reading the footer ourselves.

    Raises :class:`BuildError` listing every violated gate; returns the footer when all pass.
    """
    footer = read_vhd_footer(path)
    length = path.stat().st_size
    problems: list[str] = []
    if footer.cookie != VHD_COOKIE:
        problems.append(f"footer cookie is {footer.cookie!r}, must be {VHD_COOKIE!r}")
    if footer.checksum != footer.computed_checksum:
        problems.append(
            f"footer checksum is 0x{footer.checksum:08x}, the footer's bytes give 0x{footer.computed_checksum:08x}"
        )
    if footer.disk_type != VHD_TYPE_FIXED:
        problems.append(f"disk type is {footer.disk_type_name}, must be fixed (2)")
    if footer.data_offset != 0xFFFFFFFFFFFFFFFF:
        problems.append(f"data offset is 0x{footer.data_offset:x}, a fixed disk has 0xffffffffffffffff")
    if footer.current_size % MiB:
        problems.append(f"virtual size {footer.current_size} bytes is not a whole number of MiB")
    if not AZURE_MIN_VHD_SIZE <= footer.current_size <= AZURE_MAX_VHD_SIZE:
        problems.append(
            f"virtual size {footer.current_size} bytes is outside Azure's range "
            f"({AZURE_MIN_VHD_SIZE} to {AZURE_MAX_VHD_SIZE} bytes)"
        )
    if length != footer.current_size + VHD_FOOTER_SIZE:
        problems.append(
            f"file length {length} is not the virtual size {footer.current_size} plus the {VHD_FOOTER_SIZE}-byte footer"
        )
    if expected_size is not None and footer.current_size != expected_size:
        problems.append(f"virtual size {footer.current_size} differs from the expected {expected_size}")
    if problems:
        raise BuildError(f"{path} is not a VHD Azure accepts: " + "; ".join(problems))
    return footer


def round_up_mib(size: int) -> int:
    return -(-size // MiB) * MiB


def image_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """``qemu-img info`` as a dict (``fmt`` given: no probing, which cannot detect a fixed VHD)."""
    argv: list[str | os.PathLike[str]] = ["qemu-img", "info", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    argv.append(path)
    info: dict[str, Any] = json.loads(run(argv).stdout)
    return info


@dataclass(frozen=True)
class Artifact:
    """One captured file: its name in the version directory, format, sizes and SHA-256."""

    name: str
    format: str
    size: int  # apparent length in bytes
    allocated: int  # bytes the host filesystem really holds
    virtual_size: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "format": self.format, "size": self.size, "allocated": self.allocated,
            "virtual_size": self.virtual_size, "sha256": self.sha256,
        }


_ZEROS = bytes(4 * MiB)
_CHUNK = 4 * MiB


def _data_extents(fd: int, length: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each data region, using SEEK_DATA/SEEK_HOLE; the whole file if unsupported."""
    pos = 0
    while pos < length:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, length
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end


class Cancelled(BuildError):
    """Hashing was stopped because the capture failed elsewhere."""


def sha256_file(path: Path, cancel: threading.Event | None = None) -> str:
    """Streamed SHA-256 of ``path`` that reads only its data extents; holes hash as zeros from memory.

    ``cancel`` set stops it early (raising :class:`Cancelled`): a 30 GiB file costs tens of seconds.
    """
    h = hashlib.sha256()
    zeros = memoryview(_ZEROS)
    fd = os.open(path, os.O_RDONLY)
    try:
        length = os.fstat(fd).st_size
        pos = 0
        for start, end in _data_extents(fd, length):
            _hash_zeros(h, zeros, start - pos, cancel)
            os.lseek(fd, start, os.SEEK_SET)
            remaining = end - start
            while remaining:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"hashing {path} was cancelled")
                chunk = os.read(fd, min(_CHUNK, remaining))
                if not chunk:
                    raise BuildError(f"{path}: file shrank while being hashed")
                h.update(chunk)
                remaining -= len(chunk)
            pos = end
        _hash_zeros(h, zeros, length - pos, cancel)
    finally:
        os.close(fd)
    return h.hexdigest()


def _hash_zeros(h: Any, zeros: memoryview, count: int, cancel: threading.Event | None = None) -> None:
    while count > 0:
        if cancel is not None and cancel.is_set():
            raise Cancelled("hashing was cancelled")
        n = min(count, len(zeros))
        h.update(zeros[:n])
        count -= n


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _source_format(path: Path) -> str:
    return str(image_info(path)["format"])


def make_fixed_vhd(source: Path, dest: Path) -> int:
    """Convert ``source`` to a fixed VHD at ``dest``; returns its virtual size (rounded up to MiB).

    An unaligned source is never modified: a temporary qcow2 overlay on top of it is grown to the rounded
    size and converted instead (the added tail reads as zeros).
    """
    require("qemu-img")
    src_fmt = _source_format(source)
    vsize = int(image_info(source, src_fmt)["virtual-size"])
    size = round_up_mib(vsize)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".vhd-") as tmp:
        convert_from, convert_fmt = source, src_fmt
        if size != vsize:
            grown = Path(tmp) / "grown.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", src_fmt, "-b", source.resolve(), grown, str(size)])
            convert_from, convert_fmt = grown, "qcow2"
        run(["qemu-img", "convert", "-f", convert_fmt, "-O", "vpc", "-o", "subformat=fixed,force_size",
             convert_from, dest])
    return size


def make_qcow2_zstd(source: Path, dest: Path) -> None:
    """Write a standalone (no backing file) zstd-compressed qcow2 of ``source``."""
    require("qemu-img")
    run(["qemu-img", "convert", "-f", _source_format(source), "-O", "qcow2", "-c",
         "-o", "compression_type=zstd", source, dest])


def _artifact(path: Path, fmt: str, virtual_size: int, sha: str) -> Artifact:
    st = path.stat()
    return Artifact(name=path.name, format=fmt, size=st.st_size, allocated=st.st_blocks * 512,
                    virtual_size=virtual_size, sha256=sha)


def capture(source: Path, out_dir: Path, timings: Timings | None = None, *, compare: bool = True,
            vhd_ready: Callable[[Path], object] | None = None) -> list[Artifact]:
    """Capture ``source`` into ``out_dir`` as ``disk.vhd`` and ``disk.qcow2``; verified and hashed.

    :func:`start_capture`, then :meth:`PendingCapture.finish` at once (see there)."""
    pending = start_capture(source, out_dir, timings, compare=compare, vhd_ready=vhd_ready)
    try:
        return pending.finish()
    except BaseException:
        pending.abort()
        raise


class PendingCapture:
    """Both artifacts written and verified, their SHA-256 still running on another core: :meth:`finish`
    waits for the hashes and returns the artifacts; :meth:`abort` stops the hashing and removes both files.
    A caller that has other work (the verify boot) does it in between."""

    def __init__(self, vhd: Path, qcow: Path, size: int, qcow_size: int, timings: Timings | None) -> None:
        self.vhd, self.qcow, self.size, self.qcow_size, self._timings = vhd, qcow, size, qcow_size, timings
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._cancel = threading.Event()
        self._sums: list[Future[str]] = []
        self._closed = False

    def _hash(self, path: Path) -> None:
        self._sums.append(self._pool.submit(sha256_file, path, self._cancel))

    def finish(self) -> list[Artifact]:
        """Wait for the hashes; fsync both files; the artifacts, VHD first."""
        with step("capture: SHA-256 (waited for)", self._timings):
            vhd_sum, qcow_sum = (f.result() for f in self._sums)
        for p in (self.vhd, self.qcow):
            _fsync(p)
        self._close()
        return [_artifact(self.vhd, "vhd-fixed", self.size, vhd_sum),
                _artifact(self.qcow, "qcow2-zstd", self.qcow_size, qcow_sum)]

    def abort(self) -> None:
        """Stop the hashing and remove what the capture wrote (idempotent)."""
        self._cancel.set()
        self._close()
        for p in (self.vhd, self.qcow):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def _close(self) -> None:
        if not self._closed:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._closed = True


def start_capture(source: Path, out_dir: Path, timings: Timings | None = None, *, compare: bool = True,
                  vhd_ready: Callable[[Path], object] | None = None) -> PendingCapture:
    """Write ``source`` into ``out_dir`` as ``disk.vhd`` and ``disk.qcow2`` and verify both; their SHA-256
    runs on in the background (:class:`PendingCapture`).

    ``compare`` checks both artifacts' content against the source with ``qemu-img compare`` (sparse-aware,
    so cheap). ``vhd_ready``, if given, is called with the VHD's path once it is written and verified and
    before the qcow2 is made, so a caller can scan it early and stop a bad build sooner.
    A failure here removes what this call wrote.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    vhd = out_dir / VHD_NAME
    qcow = out_dir / QCOW2_NAME
    for p in (vhd, qcow):
        if p.exists():
            raise BuildError(f"{p} already exists; capture never overwrites an artifact")
    src_fmt = _source_format(source)
    pending = PendingCapture(vhd, qcow, 0, 0, timings)
    try:
        with step("capture: fixed VHD", timings):
            pending.size = make_fixed_vhd(source, vhd)
        with step("capture: verify VHD footer and content", timings):
            verify_azure_vhd(vhd, expected_size=pending.size)
            if compare:
                run(["qemu-img", "compare", "-f", src_fmt, "-F", "vpc", source, vhd])
        # Hashing the VHD costs a full pass of SHA-256 over its virtual size (zeros included: the hash has
        # no shortcut for them), so it runs on the second core while the rest goes on.
        pending._hash(vhd)
        if vhd_ready is not None:
            vhd_ready(vhd)
        with step("capture: zstd qcow2", timings):
            make_qcow2_zstd(source, qcow)
            if compare:
                run(["qemu-img", "compare", "-f", src_fmt, "-F", "qcow2", source, qcow])
            qinfo = image_info(qcow, "qcow2")
            if qinfo.get("backing-filename") or qinfo.get("format-specific", {}).get("data", {}).get(
                "compression-type"
            ) != "zstd":
                raise BuildError(f"{qcow}: expected a standalone zstd-compressed qcow2, qemu-img info says {qinfo}")
        pending.qcow_size = int(qinfo["virtual-size"])
        pending._hash(qcow)
        return pending
    except BaseException:
        pending.abort()
        raise


def verify_artifacts(directory: Path, artifacts: list[dict[str, Any]]) -> None:
    """Re-hash each artifact listed in a manifest and compare size and SHA-256 (raises on mismatch)."""
    problems = []
    for a in artifacts:
        p = directory / a["name"]
        if not p.is_file():
            problems.append(f"{a['name']}: missing")
            continue
        if p.stat().st_size != a["size"]:
            problems.append(f"{a['name']}: {p.stat().st_size} bytes, manifest says {a['size']}")
            continue
        digest = sha256_file(p)
        if digest != a["sha256"]:
            problems.append(f"{a['name']}: sha256 {digest}, manifest says {a['sha256']}")
    if problems:
        raise BuildError(f"{directory}: artifacts do not match the manifest: " + "; ".join(problems))
