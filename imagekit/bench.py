"""Benchmarks: how capture and the offline scan compare with plain tools doing the same work, in one run.

Machines here are shared and noisy, so no figure is meaningful alone: each step is timed next to a baseline
measured in the same run on the same file (page cache in the same state), and reported as a ratio. Every
timing is the median of ``repeat`` runs.

The disk is made like a captured image: an MBR disk of ``disk_gib`` GiB with one ext4 partition at 1 MiB
holding ``data_mib`` MiB of files, half incompressible (random) and half text, the rest a hole.

Run: ``./ik bench`` (see ``./ik bench --help``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imagekit import capture
from imagekit.core.errors import InputError
from imagekit.core.run import require, run
from imagekit.scan import ScanInput, scan_image

MIB = 1 << 20


@dataclass(frozen=True)
class Row:
    name: str
    seconds: float
    baseline: str = ""
    baseline_seconds: float = 0.0
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.seconds / self.baseline_seconds if self.baseline_seconds > 0 else None


def _median_time(fn: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tree(root: Path, data_mib: int) -> None:
    """``data_mib`` MiB of files: half random bytes, half text, in 8 MiB files (logs, libraries...)."""
    text = b"".join(b"Nov 22 04:13:14 host systemd[1]: Started unit number %d.\n" % i for i in range(200_000))
    for n in range(max(1, data_mib // 8)):
        d = root / f"usr/lib/d{n // 16}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{n}.bin").write_bytes(os.urandom(8 * MIB) if n % 2 == 0 else text[: 8 * MIB])
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/fstab").write_text("UUID=x / ext4 defaults 0 1\n")
    (root / "etc/machine-id").write_text("")


def make_disk(workdir: Path, disk_gib: int, data_mib: int) -> Path:
    require("sfdisk", "mkfs.ext4")
    tree = workdir / "tree"
    tree.mkdir()
    _tree(tree, data_mib)
    disk = workdir / "disk.raw"
    with disk.open("wb") as fh:
        fh.truncate(disk_gib << 30)
    run(["sfdisk", "-q", disk], input="label: dos\nstart=2048, type=83\n")
    run(["mkfs.ext4", "-q", "-F", "-E", f"offset={MIB}", "-d", tree, disk, f"{(disk_gib << 10) - 1}M"])
    shutil.rmtree(tree)
    return disk


def _check_sizes(disk_gib: int, data_mib: int, repeat: int) -> None:
    if disk_gib < 1 or data_mib < 8 or data_mib >= (disk_gib << 10) // 2:
        raise InputError(f"disk {disk_gib} GiB with {data_mib} MiB of data",
                         hint="the disk must be at least 1 GiB and the data 8 MiB to half the disk")
    if repeat < 1:
        raise InputError(f"repeat {repeat}", hint="at least 1")


def capture_benchmark(workdir: Path, *, disk_gib: int = 30, data_mib: int = 1024, repeat: int = 3) -> list[Row]:
    """Time imagekit's capture steps and its offline scan against baselines on one disk; see the module doc."""
    _check_sizes(disk_gib, data_mib, repeat)
    require("qemu-img", "cp", "openssl")
    disk = make_disk(workdir, disk_gib, data_mib)
    scratch = workdir / "out"

    def fresh() -> Path:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        return scratch

    def sparse_copy() -> None:
        run(["cp", "--sparse=always", disk, fresh() / "copy.raw"])

    def full_copy() -> None:
        run(["cp", "--sparse=never", disk, fresh() / "copy.raw"])

    def vhd() -> None:
        capture.make_fixed_vhd(disk, fresh() / "disk.vhd")

    copy_s = _median_time(sparse_copy, repeat)
    full_s = _median_time(full_copy, 1)  # slow by nature; once is enough to show the gap
    vhd_s = _median_time(vhd, repeat)
    vhd_path = scratch / "disk.vhd"
    vhd_alloc = vhd_path.stat().st_blocks * 512

    ours: list[str] = []
    theirs: list[str] = []

    def sha_ours() -> None:
        ours.append(capture.sha256_file(vhd_path))

    def sha_openssl() -> None:
        theirs.append(subprocess.run(["openssl", "dgst", "-sha256", "-r", vhd_path], check=True,
                                     capture_output=True, text=True).stdout.split()[0])

    sha_base_s = _median_time(sha_openssl, repeat)
    sha_s = _median_time(sha_ours, repeat)
    if len(set(ours + theirs)) != 1:
        raise AssertionError("imagekit's sparse-aware SHA-256 differs from openssl's")

    def scan() -> None:
        if scan_image(vhd_path, "vpc", ScanInput(usernames=["benchuser"])):
            raise AssertionError("the benchmark disk holds nothing the scan should find")

    scan_s = _median_time(scan, repeat)

    def qcow_zlib() -> None:
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", disk, fresh() / "zlib.qcow2"])

    def qcow_zstd() -> None:
        capture.make_qcow2_zstd(disk, fresh() / "disk.qcow2")

    zlib_s = _median_time(qcow_zlib, repeat)
    zlib_size = (scratch / "zlib.qcow2").stat().st_size
    zstd_s = _median_time(qcow_zstd, repeat)
    zstd_size = (scratch / "disk.qcow2").stat().st_size

    def whole() -> None:
        capture.capture(disk, fresh() / "cap")

    whole_s = _median_time(whole, repeat)
    shutil.rmtree(scratch, ignore_errors=True)
    disk.unlink()
    gib = f"{disk_gib} GiB disk, {data_mib} MiB of data"
    return [
        Row("sparse copy (cp --sparse=always)", copy_s, note=f"{gib}; the floor: the data read and written once"),
        Row("full copy (cp --sparse=never)", full_s, "sparse copy", copy_s, "what a sparse-unaware tool pays"),
        Row("fixed VHD (make_fixed_vhd)", vhd_s, "sparse copy", copy_s,
            f"allocated {vhd_alloc / MIB:.0f} MiB of {(disk_gib << 10) + 1} MiB"),
        Row("SHA-256 of the VHD (sha256_file)", sha_s, "openssl dgst -sha256", sha_base_s,
            "both hash every byte with OpenSSL; ours reads only the data extents"),
        Row("zstd qcow2 (make_qcow2_zstd)", zstd_s, "zlib qcow2 (qemu-img -c)", zlib_s,
            f"size {zstd_size / MIB:.0f} MiB vs {zlib_size / MIB:.0f} MiB"),
        Row("offline leak scan of the VHD", scan_s, "sparse copy", copy_s, "mount read-only, walk, read files"),
        Row("whole capture (VHD, verify, qcow2, SHA-256)", whole_s, "sparse copy", copy_s),
    ]


def render(rows: list[Row]) -> str:
    lines = [f"{'step':44} {'seconds':>8}  {'× baseline':>10}  baseline / note"]
    for r in rows:
        ratio = f"{r.ratio:10.2f}" if r.ratio is not None else f"{'—':>10}"
        tail = "; ".join(x for x in (r.baseline and f"{r.baseline} {r.baseline_seconds:.2f} s", r.note) if x)
        lines.append(f"{r.name:44} {r.seconds:8.2f}  {ratio}  {tail}")
    return "\n".join(lines)


def run_capture_benchmark(workdir: Path | None, **kwargs: int) -> list[Row]:
    """:func:`capture_benchmark` in a temporary directory (under ``workdir``) that is removed afterwards."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="ik-bench-") as tmp:
        return capture_benchmark(Path(tmp), **kwargs)
