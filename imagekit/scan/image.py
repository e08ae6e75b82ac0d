"""The offline scan of a captured disk, on the host, never booting it.

:func:`scan_image` reads each Linux partition read-only (``ro,noload`` for ext4, so not even the journal is
replayed; ``ro,norecovery`` for xfs) through a loop device with the partition's offset, inside a private
mount namespace created for the scan: if the scan dies, the kernel drops the mount and the auto-clearing
loop device with the namespace. The partitions are put together as the image's own /etc/fstab says, so a
separate /home or /var is scanned where it belongs. The rules live in :mod:`imagekit.scan.rules`; a finding
fails the build (:class:`LeakFound`) and names the file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imagekit.core.errors import BuildError
from imagekit.core.log import Timings, step
from imagekit.core.paths import REPO_ROOT
from imagekit.core.run import require, run
from imagekit.scan.rules import Finding, ScanInput

log = logging.getLogger("imagekit.scan.image")


class LeakFound(BuildError):
    """The offline scan found something that must not ship."""

    def __init__(self, image: Path, findings: list[Finding]) -> None:
        self.findings = findings
        lines = "\n".join(f"  - {f}" for f in findings[:60])
        more = f"\n  … and {len(findings) - 60} more" if len(findings) > 60 else ""
        super().__init__(f"{image}: the offline scan found {len(findings)} thing(s) that must not ship:\n{lines}{more}",
                         hint="the image was not deprovisioned (or not completely); nothing was registered")



# partition types we scan: MBR Linux, GPT Linux filesystem / root (x86-64)
_LINUX_TYPES = {"83", "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"}


@dataclass(frozen=True)
class Partition:
    offset: int
    size: int
    fstype: str
    uuid: str = ""  # the file system's
    label: str = ""
    partuuid: str = ""  # the partition table's (GPT partition GUID, or MBR disk id + number)


def find_partitions(image: Path, raw_size: int) -> list[Partition]:
    """Linux filesystems in a raw disk image (``raw_size``: its length without a VHD footer)."""
    require("sfdisk", "blkid")
    res = run(["sfdisk", "--json", image], check=False)
    parts: list[tuple[int, int, str]] = []
    if res.returncode == 0 and res.stdout.strip():
        table = json.loads(res.stdout)["partitiontable"]
        sector = int(table.get("sectorsize", 512))
        disk_id = str(table.get("id", "")).lower().removeprefix("0x")
        for n, p in enumerate(table.get("partitions", []), 1):
            if str(p.get("type", "")).upper() in _LINUX_TYPES:
                partuuid = str(p.get("uuid", "")).lower() or (f"{disk_id}-{n:02x}" if disk_id else "")
                parts.append((int(p["start"]) * sector, int(p["size"]) * sector, partuuid))
    else:
        parts.append((0, raw_size, ""))  # a bare filesystem, no partition table
    out = []
    for offset, size, partuuid in parts:
        info = run(["blkid", "-p", "-O", str(offset), "-o", "export", image], check=False).stdout
        fields = dict(line.split("=", 1) for line in info.splitlines() if "=" in line)
        if fields.get("TYPE"):
            out.append(Partition(offset, size, fields["TYPE"], fields.get("UUID", "").lower(),
                                 fields.get("LABEL", ""), partuuid))
    return out


def fstab_mounts(fstab: str) -> list[tuple[str, str]]:
    """(source, mount point) of the file systems an image's /etc/fstab mounts below ``/``, shallowest
    first (so /var is in place before /var/log); swap, pseudo file systems and ``/`` itself left out."""
    out = []
    for line in fstab.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 3 or not fields[1].startswith("/") or fields[1] == "/":
            continue
        if fields[2] in ("swap", "none", "proc", "sysfs", "tmpfs", "devpts", "bind") or "bind" in fields[3:4]:
            continue
        mountpoint = os.path.normpath(fields[1].replace("\\040", " "))
        out.append((fields[0], mountpoint))
    return sorted(out, key=lambda sm: sm[1].count("/"))


def matches(source: str, p: Partition) -> bool:
    """Whether an fstab source names this partition (UUID=, LABEL=, PARTUUID= or their /dev/disk/by-* links)."""
    kind, _, value = source.partition("=")
    if not value:
        for prefix, k in (("/dev/disk/by-uuid/", "UUID"), ("/dev/disk/by-label/", "LABEL"),
                          ("/dev/disk/by-partuuid/", "PARTUUID")):
            if source.startswith(prefix):
                kind, value = k, source[len(prefix):]
                break
        else:
            return False
    value = value.strip('"')
    if kind == "UUID":
        return bool(p.uuid) and value.lower() == p.uuid
    if kind == "LABEL":
        return bool(p.label) and value == p.label
    if kind == "PARTUUID":
        return bool(p.partuuid) and value.lower() == p.partuuid
    return False


def mount_options(fstype: str) -> str:
    if fstype.startswith("ext"):
        return "ro,noload"
    if fstype == "xfs":
        return "ro,norecovery"
    return "ro"


def scan_image(image: Path, fmt: str, inp: ScanInput, workdir: Path | None = None) -> list[Finding]:
    """Scan every Linux filesystem in ``image`` (``raw``, ``vpc`` fixed VHD, or anything qemu-img reads:
    then a sparse raw copy is made first) and return the findings."""
    require("qemu-img", "unshare", "mount", "umount")
    if os.geteuid() != 0:
        raise BuildError("the offline scan mounts the image read-only through a loop device and needs root")
    with tempfile.TemporaryDirectory(dir=workdir, prefix="ik-scan-") as tmp:
        if fmt in ("raw", "vpc"):
            raw = image
            raw_size = image.stat().st_size - (512 if fmt == "vpc" else 0)
        else:
            raw = Path(tmp) / "disk.raw"
            run(["qemu-img", "convert", "-f", fmt, "-O", "raw", image, raw])  # sparse: only data is written
            raw_size = raw.stat().st_size
        partitions = find_partitions(raw, raw_size)
        if not partitions:
            raise BuildError(f"{image}: no Linux filesystem found to scan")
        job = {"image": str(raw), "mountpoint": str(Path(tmp) / "mnt"),
               "partitions": [p.__dict__ for p in partitions],
               "usernames": inp.usernames, "hostnames": inp.hostnames, "password": inp.password}
        res = run(["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m",
                   "imagekit.scan.worker"], input=json.dumps(job),
                  env={"PYTHONPATH": str(REPO_ROOT)}, timeout=1800)
    found = [Finding(**f) for f in json.loads(res.stdout)]
    return found


def check_image(image: Path, fmt: str, inp: ScanInput, timings: Timings | None = None) -> list[Finding]:
    """:func:`scan_image`, raising :class:`LeakFound` when anything is found; returns the (empty) findings."""
    with step("offline leak scan", timings):
        findings = scan_image(image, fmt, inp)
        if findings:
            raise LeakFound(image, findings)
    return findings
