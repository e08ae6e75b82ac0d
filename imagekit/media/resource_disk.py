"""The resource (temporary) disk, made as Azure delivers it.

Azure attaches a fresh resource disk with an MBR partition table holding one NTFS partition (type 7)
that contains ``DATALOSS_WARNING_README.txt``. Both agents look for exactly that: waagent re-types the
partition and formats it (a blank disk stops it at "Could not determine partition info"), and cloud-init
reformats only an NTFS partition with nothing but that readme on it.

The disk is built without mounting anything and without loop devices: the NTFS file system is made in a
separate sparse file (``mkntfs`` and ``ntfscp`` from ntfs-3g work on plain files), then its allocated
extents are copied into the disk image at the partition's offset, so the result stays sparse.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from imagekit.core.errors import InputError
from imagekit.core.run import require, run

SECTOR = 512
PARTITION_START_SECTOR = 2048  # 1 MiB, as every current partitioning tool aligns
NTFS_PARTITION_TYPE = "7"
VOLUME_LABEL = "Temporary Storage"
README_NAME = "DATALOSS_WARNING_README.txt"
# The text Azure's own resource disk carries (as Windows guests see it on D:).
README_TEXT = (
    "WARNING: THIS IS A TEMPORARY DISK.\r\n"
    "\r\n"
    "Any data stored on this drive is SUBJECT TO LOSS and THERE IS NO WAY TO RECOVER IT.\r\n"
    "\r\n"
    "Please do not use this disk for storing any personal or application data.\r\n"
    "\r\n"
    "For additional details to please refer to the MSDN documentation at: "
    "http://msdn.microsoft.com/en-us/library/windowsazure/jj672979.aspx\r\n"
)
MIN_SIZE_MIB = 64
MAX_SIZE_MIB = 4 * 1024 * 1024


def create_resource_disk(path: Path, size_mib: int = 2048) -> Path:
    """Write a sparse raw resource disk of ``size_mib`` MiB to ``path`` (atomically) and return it."""
    if not MIN_SIZE_MIB <= size_mib <= MAX_SIZE_MIB:
        raise InputError(f"bad resource disk size {size_mib} MiB; allowed: {MIN_SIZE_MIB} to {MAX_SIZE_MIB}")
    require("sfdisk", "mkntfs", "ntfscp")
    path = Path(path)
    size = size_mib * 1024 * 1024
    part_sectors = size // SECTOR - PARTITION_START_SECTOR
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    part_fd, part_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".ntfs")
    part = Path(part_name)
    try:
        os.ftruncate(fd, size)
        os.close(fd)
        fd = -1
        run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", "--label", "dos", tmp],
            input=f"start={PARTITION_START_SECTOR}, size={part_sectors}, type={NTFS_PARTITION_TYPE}\n")
        os.ftruncate(part_fd, part_sectors * SECTOR)
        os.close(part_fd)
        part_fd = -1
        # -p/-H/-S only fill the boot sector's geometry fields, which Windows checks on a real partition;
        # -F because the target is a file, not a block device.
        run(["mkntfs", "-Q", "-F", "-q", "-L", VOLUME_LABEL, "-s", str(SECTOR), "-p",
             str(PARTITION_START_SECTOR), "-H", "255", "-S", "63", part, str(part_sectors)])
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".readme.", newline="") as readme:
            readme.write(README_TEXT)
            readme.flush()
            run(["ntfscp", "-q", part, readme.name, README_NAME])
        _copy_sparse(part, tmp, PARTITION_START_SECTOR * SECTOR)
        os.replace(tmp, path)
    finally:
        for f in (fd, part_fd):
            if f >= 0:
                os.close(f)
        for p in (tmp, part):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return path


def _copy_sparse(src: Path, dst: Path, offset: int) -> None:
    """Copy ``src``'s data extents into ``dst`` at ``offset``, leaving holes as holes."""
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        end = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < end:
            try:
                data_start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            hole = os.lseek(fin.fileno(), data_start, os.SEEK_HOLE)
            fin.seek(data_start)
            fout.seek(offset + data_start)
            remaining = hole - data_start
            while remaining:
                chunk = fin.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                fout.write(chunk)
                remaining -= len(chunk)
            pos = hole
