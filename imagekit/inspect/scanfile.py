"""``scan FILE``: the offline leak scan (what ``build`` runs before registering) of an image from anywhere.

The file is opened read-only as for ``inspect`` (:func:`imagekit.inspect.source.open_disk`: a raw file or
a fixed VHD is read in place, any other format through a temporary sparse raw copy), its Linux root is
found first (an image without one is an error, not a clean result), then :func:`imagekit.scan.scan_image`
runs the rules. With no build VM to name, the rules find leftover users by what they left: regular
accounts, homes, their SSH keys and sudoers rules, and those users' names in logs and /etc.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imagekit.inspect import parse
from imagekit.inspect.report import _need_root, read_tree, require_linux_root
from imagekit.inspect.source import open_disk
from imagekit.scan import Finding, ScanInput, scan_image


@dataclass
class ScanResult:
    path: str
    format: str
    os: str
    findings: list[Finding]


def scan_file(path: Path, inp: ScanInput | None = None, workdir: Path | None = None) -> ScanResult:
    _need_root()
    with open_disk(path, workdir) as disk:
        facts = read_tree(disk, deep=False)
        require_linux_root(disk, facts)
        osr = parse.os_release(facts.get("os_release", ""))
        findings = scan_image(disk.raw, disk.scan_format, inp or ScanInput(), disk.workdir)
    return ScanResult(str(path), disk.info.label, osr.get("PRETTY_NAME", "") or osr.get("ID", ""), findings)
