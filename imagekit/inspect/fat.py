"""A read-only FAT12/16/32 reader for EFI system partitions, in user space.

The EFI system partition is read without mounting it (a host kernel need not have vfat): the boot sector's
BIOS parameter block, the file allocation table and the directories, long file names included. Only reads;
every cluster chain is bounded, so a damaged file system gives an error, never a loop.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO


class FatError(ValueError):
    """Not a FAT file system this reader understands, or a damaged one."""


@dataclass(frozen=True)
class Entry:
    path: str  # "/EFI/BOOT/BOOTX64.EFI"
    is_dir: bool
    cluster: int
    size: int


class Fat:
    def __init__(self, fh: BinaryIO, offset: int, size: int) -> None:
        self.fh, self.offset, self.size = fh, offset, size
        bs = self._read(0, 512)
        if len(bs) < 512 or bs[510:512] != b"\x55\xaa":
            raise FatError("no FAT boot sector")
        bps, spc, reserved, nfats, root_entries, total16, _media, fatsz16 = struct.unpack_from("<HBHBHHBH", bs, 11)
        total32, fatsz32, _flags, _ver, root_cluster = struct.unpack_from("<IIHHI", bs, 32)
        if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or nfats == 0:
            raise FatError("bad BIOS parameter block")
        self.bps, self.spc = bps, spc
        fatsz = fatsz16 or fatsz32
        total = total16 or total32
        root_sectors = (root_entries * 32 + bps - 1) // bps
        self.fat_start = reserved * bps
        self.root_start = (reserved + nfats * fatsz) * bps
        self.root_size = root_sectors * bps
        self.data_start = self.root_start + self.root_size
        self.clusters = (total - reserved - nfats * fatsz - root_sectors) // spc
        self.bits = 12 if self.clusters < 4085 else 16 if self.clusters < 65525 else 32
        self.root_cluster = root_cluster if self.bits == 32 else 0

    def _read(self, at: int, n: int) -> bytes:
        if at < 0 or at + n > self.size:
            raise FatError(f"read past the end of the file system (byte {at + n} of {self.size})")
        self.fh.seek(self.offset + at)
        return self.fh.read(n)

    def _next(self, cluster: int) -> int:
        if self.bits == 32:
            (v,) = struct.unpack("<I", self._read(self.fat_start + cluster * 4, 4))
            return int(v) & 0x0FFFFFFF
        if self.bits == 16:
            (v,) = struct.unpack("<H", self._read(self.fat_start + cluster * 2, 2))
            return int(v)
        (v,) = struct.unpack("<H", self._read(self.fat_start + cluster * 3 // 2, 2))
        return int(v >> 4 if cluster & 1 else v & 0xFFF)

    def _chain(self, cluster: int, limit: int) -> bytes:
        out = bytearray()
        end = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[self.bits]
        csize = self.bps * self.spc
        seen = 0
        while 2 <= cluster < end and len(out) < limit:
            if cluster >= self.clusters + 2 or seen > self.clusters:
                raise FatError("a cluster chain runs outside the file system")
            out += self._read(self.data_start + (cluster - 2) * csize, csize)
            cluster = self._next(cluster)
            seen += 1
        return bytes(out[:limit])

    def _dir(self, cluster: int) -> list[tuple[str, bool, int, int]]:
        data = self._read(self.root_start, self.root_size) if cluster == 0 else self._chain(cluster, 4 << 20)
        out = []
        lfn: list[str] = []
        for i in range(0, len(data) - 31, 32):
            e = data[i:i + 32]
            if e[0] == 0:
                break
            if e[0] == 0xE5:
                lfn = []
                continue
            attr = e[11]
            if attr == 0x0F:
                part = (e[1:11] + e[14:26] + e[28:32]).decode("utf-16-le", errors="replace")
                lfn.insert(0, part.split("\0")[0].replace("\uffff", ""))
                continue
            if attr & 0x08:  # volume label
                lfn = []
                continue
            base, ext = e[0:8].decode("latin-1").rstrip(), e[8:11].decode("latin-1").rstrip()
            name = "".join(lfn) or (base + ("." + ext if ext else ""))
            lfn = []
            if name in (".", ".."):
                continue
            hi, lo = struct.unpack_from("<H", e, 20)[0], struct.unpack_from("<H", e, 26)[0]
            (size,) = struct.unpack_from("<I", e, 28)
            out.append((name, bool(attr & 0x10), (hi << 16 | lo) if self.bits == 32 else lo, size))
        return out

    def walk(self, max_entries: int = 4096, max_depth: int = 6) -> list[Entry]:
        """Every file and directory, depth first, names as stored (FAT keeps case, compares without it)."""
        out: list[Entry] = []
        stack = [("", self.root_cluster, 0)]
        while stack:
            prefix, cluster, depth = stack.pop()
            for name, is_dir, first, size in self._dir(cluster):
                entry = Entry(f"{prefix}/{name}", is_dir, first, size)
                out.append(entry)
                if len(out) > max_entries:
                    raise FatError(f"more than {max_entries} entries")
                if is_dir and depth < max_depth and first:
                    stack.append((entry.path, first, depth + 1))
        return sorted(out, key=lambda x: x.path.lower())

    def read(self, entry: Entry, limit: int) -> bytes:
        return self._chain(entry.cluster, min(limit, entry.size))
