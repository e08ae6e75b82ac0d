"""Disk images without mounts or loop devices.

A raw, sparse disk file gets an MBR partition table (sfdisk works on files), an ext4 file system made
straight from a directory at the partition's byte offset (``mkfs.ext4 -d DIR -E offset=...``), and GRUB's
BIOS boot code written into the MBR and the gap before the first partition. The last step is what
``grub-bios-setup`` does when it embeds ``core.img``; that tool insists on finding a block device for its
module directory, which a file in a build directory does not have, so the few bytes it patches are
patched here (offsets from GRUB's ``include/grub/i386/pc/boot.h``). Nothing is mounted, so an interrupted
build leaves nothing behind but files in its own temp directory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from imagekit.core.errors import BuildError
from imagekit.core.run import run

SECTOR = 512
MIB = 1024 * 1024
PARTITION_START_SECTOR = 2048  # 1 MiB: what Azure and every modern partitioner use

# GRUB i386-pc boot sector layout
_BPB_START, _BPB_END = 0x03, 0x5A
_KERNEL_SECTOR = 0x5C
_BOOT_DRIVE = 0x64
_DRIVE_CHECK = 0x66
_NT_MAGIC, _PART_END = 0x1B8, 0x1FE


@dataclass(frozen=True)
class Partition:
    start_sector: int
    size_sectors: int
    type: str
    bootable: bool

    @property
    def offset(self) -> int:
        return self.start_sector * SECTOR


def create_raw(path: Path, size_mib: int) -> None:
    """A sparse raw disk of exactly ``size_mib`` MiB with one bootable Linux partition at 1 MiB."""
    with path.open("wb") as f:
        f.truncate(size_mib * MIB)
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
        input=f"label: dos\nstart={PARTITION_START_SECTOR}, type=83, bootable\n")


def partitions(path: Path) -> list[Partition]:
    """The partition table of a raw disk file, read with ``sfdisk --json``."""
    out = run(["sfdisk", "--json", str(path)]).stdout
    table = json.loads(out).get("partitiontable", {})
    return [
        Partition(int(p["start"]), int(p["size"]), str(p.get("type", "")), bool(p.get("bootable", False)))
        for p in table.get("partitions", [])
    ]


def make_ext4(path: Path, part: Partition, source_dir: Path, *, uuid: str, label: str,
              mke2fs_conf: Path | None = None) -> None:
    """Make ext4 on ``part`` of the raw disk ``path``, populated from ``source_dir``.

    ``mke2fs_conf`` should be the target's own ``/etc/mke2fs.conf`` so the file system has only features
    the target's e2fsck and GRUB understand (a newer host would otherwise enable e.g. orphan_file).
    """
    env = {"MKE2FS_CONFIG": str(mke2fs_conf)} if mke2fs_conf and mke2fs_conf.is_file() else {}
    blocks_1k = part.size_sectors * SECTOR // 1024
    run(["mkfs.ext4", "-F", "-q", "-t", "ext4", "-L", label, "-U", uuid,
         "-E", f"offset={part.offset}", "-d", str(source_dir), str(path), f"{blocks_1k}k"], env=env)
    # mke2fs -d reports few copy errors; e2fsck catches a damaged result before it is cached.
    check_ext4(path, part)


def check_ext4(path: Path, part: Partition) -> None:
    """Read-only e2fsck of the partition (through a fresh file handle at the offset)."""
    # e2fsck has no offset option; the unix I/O manager takes one after '?'.
    res = run(["e2fsck", "-f", "-n", f"{path}?offset={part.offset}"], check=False)
    if res.returncode != 0:
        raise BuildError(f"the new root file system does not check clean (e2fsck exit {res.returncode}):\n"
                         + "\n".join(res.stdout.splitlines()[-10:] + res.stderr.splitlines()[-10:]))


def install_grub_bios(path: Path, boot_img: Path, core_img: Path) -> None:
    """Write GRUB's boot.img into the MBR (keeping the partition table) and core.img from sector 1.

    core.img made by ``grub-mkimage -O i386-pc`` already carries a block list pointing at sector 2 for
    the sectors after its first, so placed at sector 1 it needs no patching; boot.img needs the sector of
    core.img (1), the boot drive (0xff: use the BIOS's), the hard-disk workaround (grub-bios-setup replaces
    the floppy check with NOPs) and the disk's own partition table and signature.
    """
    boot = bytearray(boot_img.read_bytes())
    core = core_img.read_bytes()
    if len(boot) != SECTOR or boot[510:512] != b"\x55\xaa":
        raise BuildError(f"{boot_img}: not a GRUB boot.img (expected 512 bytes ending 55 AA)")
    sectors = (len(core) + SECTOR - 1) // SECTOR
    if sectors + 1 > PARTITION_START_SECTOR:
        raise BuildError(f"{core_img}: {sectors} sectors do not fit before the partition at sector "
                         f"{PARTITION_START_SECTOR}")
    start, length, segment = struct.unpack_from("<QHH", core, SECTOR - 12)
    if (start, length, segment) != (2, sectors - 1, 0x820):
        raise BuildError(f"{core_img}: unexpected block list (start {start}, {length} sectors, segment "
                         f"{segment:#x}); expected a core.img from grub-mkimage -O i386-pc")
    with path.open("r+b") as f:
        mbr = f.read(SECTOR)
        boot[_BPB_START:_BPB_END] = mbr[_BPB_START:_BPB_END]
        boot[_DRIVE_CHECK:_DRIVE_CHECK + 2] = b"\x90\x90"
        boot[_NT_MAGIC:_PART_END] = mbr[_NT_MAGIC:_PART_END]
        struct.pack_into("<Q", boot, _KERNEL_SECTOR, 1)
        boot[_BOOT_DRIVE] = 0xFF
        f.seek(0)
        f.write(bytes(boot))
        f.seek(SECTOR)
        f.write(core)
        f.flush()
        os.fsync(f.fileno())


def to_qcow2(raw: Path, out: Path) -> None:
    """Convert to qcow2; zero runs stay unallocated, so the file stays about as large as the data."""
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)])


def qemu_img_info(path: Path) -> dict[str, object]:
    info: dict[str, object] = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    return info
