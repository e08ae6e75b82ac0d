"""An image file from anywhere, opened read-only: what it is, and a raw view of its disk.

:func:`probe` checks the path (a readable regular file), asks ``qemu-img info`` for the format and reads a
VHD footer itself (qemu-img takes a fixed VHD for raw: it has its footer only at the end). :func:`open_disk`
yields a :class:`RawDisk`: the file itself when it is raw or a fixed VHD (the data is the file minus the
footer), otherwise a sparse raw copy converted by ``qemu-img convert`` into a private directory under the
cache dir, removed on exit, also on Ctrl-C (a directory left by a killed run is removed by the next run).
The input is only ever opened for reading. :func:`partitions` reads the partition table (``sfdisk``) and each
file system (``blkid -p`` at the partition's offset); a partition that runs past the end of the data is the
mark of a truncated file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imagekit.core.errors import CommandError, InputError
from imagekit.core.paths import cache_dir
from imagekit.core.run import require, run
from imagekit.inspect import parse

MIB = 1 << 20
ALLOWED = "a disk image file qemu-img reads (qcow2, raw, VHD fixed or dynamic, VMDK, VDI, ...) holding a Linux root"
# Partition types, as sfdisk prints them (MBR: hex byte; GPT: upper-case GUID).
PART_TYPES = {
    "83": "Linux", "82": "Linux swap", "8e": "Linux LVM", "ef": "EFI System", "ee": "GPT protective",
    "7": "NTFS/exFAT", "b": "FAT32", "c": "FAT32 (LBA)", "5": "Extended", "f": "Extended (LBA)",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE": "Linux root (ARM64)",
    "BC13C2FF-59E6-4262-A352-B275FD6F7172": "Linux extended boot",
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
}
ESP_TYPES = {"ef", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"}
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str  # qemu-img's name: qcow2, raw, vpc, vmdk, ...
    subformat: str  # VHD: fixed, dynamic, differencing; else ""
    virtual_size: int
    file_size: int
    backing_file: str = ""
    vhd_checksum_ok: bool | None = None

    @property
    def azure_ready(self) -> bool:
        """Azure takes the file as it is: a fixed VHD whose virtual size is a whole number of MiB."""
        return self.format == "vpc" and self.subformat == "fixed" and self.virtual_size % MIB == 0

    @property
    def label(self) -> str:
        if self.format == "vpc":
            return f"VHD ({self.subformat})"
        return self.format


@dataclass(frozen=True)
class Part:
    number: int  # 1-based; 0 for a file system on the whole disk
    offset: int
    size: int
    type: str  # as sfdisk prints it
    fstype: str = ""
    uuid: str = ""
    label: str = ""
    partuuid: str = ""
    bootable: bool = False

    @property
    def type_name(self) -> str:
        return PART_TYPES.get(self.type.lower() if len(self.type) <= 2 else self.type.upper(), self.type)

    @property
    def is_esp(self) -> bool:
        return self.type.upper() in ESP_TYPES or self.type.lower() in ESP_TYPES

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "type_name": self.type_name}


@dataclass
class RawDisk:
    info: ImageInfo
    raw: Path  # the file to read the disk from (the input itself when raw or a fixed VHD)
    size: int  # bytes of disk data in ``raw`` (a fixed VHD's footer left out)
    scan_format: str  # what imagekit.scan.scan_image takes for ``raw``: "raw" or "vpc"
    table: str = ""  # dos, gpt, or "" (no partition table)
    parts: list[Part] = field(default_factory=list)
    workdir: Path | None = None  # the private directory of this run (temp files)


def _bad(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}; allowed: {ALLOWED}")


def check_path(path: Path) -> os.stat_result:
    """A regular file this process can read, or a one-line error saying what it is instead."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _bad(path, "no such file") from None
    except PermissionError:
        raise _bad(path, "cannot be read (permission denied on the path)") from None
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise _bad(path, "is a directory, not a disk image file")
    if not stat.S_ISREG(st.st_mode):
        raise _bad(path, "is not a regular file (a device, FIFO or socket)")
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror})") from None
    if st.st_size < 512:
        raise _bad(path, f"not a disk image: {st.st_size} bytes, less than one sector")
    return st


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def probe(path: Path) -> ImageInfo:
    """What the file is: format, VHD sub-format, virtual size (read-only; a bad file is an InputError)."""
    require("qemu-img")
    st = check_path(path)
    res = run(["qemu-img", "info", "-U", "--output=json", path], check=False)  # -U: also while a VM has it open
    if res.returncode != 0:
        msg = _first_line(res.stderr).removeprefix("qemu-img: ")
        raise _bad(path, f"not readable as a disk image: qemu-img says: {msg}")
    info = json.loads(res.stdout)
    fmt = str(info.get("format", ""))
    with path.open("rb") as fh:
        head = fh.read(512)
        fh.seek(st.st_size - 512)
        tail = fh.read(512)
    footer = parse.vhd_footer(tail)
    head_footer = parse.vhd_footer(head)
    if fmt == "raw" and footer is not None:
        if not footer.checksum_ok:
            raise _bad(path, "a VHD whose footer has a bad checksum (damaged)")
        if footer.disk_type != "fixed":
            raise _bad(path, f"a {footer.disk_type} VHD that qemu-img cannot open")
        if footer.current_size != st.st_size - 512:
            raise _bad(path, f"a fixed VHD of {footer.current_size} bytes (its footer) in a file of {st.st_size} "
                       f"bytes (expected {footer.current_size + 512}: truncated or padded)")
        return ImageInfo(str(path), "vpc", "fixed", footer.current_size, st.st_size, vhd_checksum_ok=True)
    if fmt == "raw" and head_footer is not None:
        # a dynamic VHD's copy of its footer at the start, and no footer at the end: cut short
        raise _bad(path, f"a truncated {head_footer.disk_type} VHD: its footer is missing at the end of the file")
    subformat = ""
    ok = None
    if fmt == "vpc":
        f = footer or head_footer
        subformat = f.disk_type if f else "dynamic"
        ok = f.checksum_ok if f else None
    backing = str(info.get("backing-filename", "") or info.get("full-backing-filename", "") or "")
    if backing:
        raise _bad(path, f"an overlay on {backing!r}; inspect the image it is based on, or flatten it with "
                   "qemu-img convert first")
    return ImageInfo(str(path), fmt, subformat, int(info.get("virtual-size", 0)), st.st_size, "", ok)


def _reap_dead_runs(top: Path) -> None:
    """Private directories of runs that were killed (their pid is gone)."""
    if not top.is_dir():
        return
    for d in top.glob("run-*"):
        m = re.match(r"^run-(\d+)-", d.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            shutil.rmtree(d, ignore_errors=True)


def partitions(raw: Path, size: int) -> tuple[str, list[Part]]:
    """The partition table of a raw disk and each partition's file system (blkid -p, read-only)."""
    require("sfdisk", "blkid")
    res = run(["sfdisk", "--json", raw], check=False)
    found: list[tuple[int, int, int, str, str, bool]] = []
    label = ""
    if res.returncode == 0 and res.stdout.strip():
        table = json.loads(res.stdout)["partitiontable"]
        label = str(table.get("label", ""))
        sector = int(table.get("sectorsize", 512))
        disk_id = str(table.get("id", "")).lower().removeprefix("0x")
        for n, p in enumerate(table.get("partitions", []), 1):
            m = re.search(r"(\d+)$", str(p.get("node", "")))
            number = int(m.group(1)) if m else n
            partuuid = str(p.get("uuid", "")).lower() or (f"{disk_id}-{number:02x}" if disk_id else "")
            found.append((number, int(p["start"]) * sector, int(p["size"]) * sector, str(p.get("type", "")),
                          partuuid, bool(p.get("bootable", False))))
    else:
        found.append((0, 0, size, "", "", False))
    parts = []
    for number, offset, psize, ptype, partuuid, bootable in found:
        fields: dict[str, str] = {}
        if offset < size:
            info = run(["blkid", "-p", "-O", str(offset), "-S", str(min(psize, size - offset)), "-o", "export", raw],
                       check=False).stdout
            fields = dict(line.split("=", 1) for line in info.splitlines() if "=" in line)
        parts.append(Part(number, offset, psize, ptype, fields.get("TYPE", ""), fields.get("UUID", "").lower(),
                          fields.get("LABEL", ""), partuuid, bootable))
    if label == "" and not parts[0].fstype:
        parts = []
    return label, parts


def _check_gpt(path: Path, disk: RawDisk) -> None:
    """sfdisk shows a GPT whose backup header lies past the end only as its protective MBR: say why."""
    if disk.table != "dos" or not any(p.type.lower() == "ee" for p in disk.parts):
        return
    with disk.raw.open("rb") as fh:
        fh.seek(512)
        header = fh.read(92)
    if header[:8] != b"EFI PART":
        raise _bad(path, "a protective MBR without a GPT header behind it (damaged)")
    (backup,) = struct.unpack_from("<Q", header, 32)
    if (backup + 1) * 512 > disk.size:
        raise _bad(path, f"truncated: its GPT says the disk has {(backup + 1) * 512} bytes, but the disk data ends "
                   f"at byte {disk.size}")
    raise _bad(path, "a GPT that sfdisk cannot read (damaged)")


@contextlib.contextmanager
def open_disk(path: Path, workdir: Path | None = None) -> Iterator[RawDisk]:
    """Probe ``path`` and yield a raw view of its disk with the partitions read; temp files removed on exit."""
    info = probe(path)
    top = workdir or cache_dir() / "inspect"
    top.mkdir(parents=True, exist_ok=True)
    _reap_dead_runs(top)
    tmp = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=top))
    try:
        if info.format == "raw":
            disk = RawDisk(info, path, info.file_size, "raw", workdir=tmp)
        elif info.format == "vpc" and info.subformat == "fixed":
            disk = RawDisk(info, path, info.file_size - 512, "vpc", workdir=tmp)
        else:
            raw = tmp / "disk.raw"
            try:
                # sparse: only data is written; -U: never take (or need) a lock on the input
                run(["qemu-img", "convert", "-U", "-f", info.format, "-O", "raw", path, raw])
            except CommandError as exc:
                raise _bad(path, f"qemu-img cannot read its data: {_first_line(exc.stderr)}") from None
            disk = RawDisk(info, raw, raw.stat().st_size, "raw", workdir=tmp)
        disk.table, disk.parts = partitions(disk.raw, disk.size)
        if not disk.parts:
            raise _bad(path, f"not a disk image: qemu-img reads it as {info.format}, but it holds no partition "
                       "table and no file system")
        _check_gpt(path, disk)
        for p in disk.parts:
            if p.offset + p.size > disk.size:
                where = f"partition {p.number}" if p.number else "the file system"
                raise _bad(path, f"truncated: {where} ends at byte {p.offset + p.size}, but the disk data ends at "
                           f"byte {disk.size}")
        yield disk
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
