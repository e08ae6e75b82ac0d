"""Pure parsers for what ``inspect`` reads out of an image: no I/O, so each is tested on literal text.

os-release, waagent.conf, cloud-init's ``datasource_list`` (the subset of YAML cloud-init's configs use
for it, and JSON), kernel command lines (grub.cfg, /etc/default/grub, BLS entries, extlinux), the names in
an initramfs (newc cpio archives, concatenated, each compressed or not, as initramfs-tools and dracut
write them), a VHD footer, and the BIOS boot code in a disk's first sector.
"""

from __future__ import annotations

import bz2
import lzma
import re
import shlex
import struct
import subprocess
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

# --- /etc/os-release --------------------------------------------------------------------------------------


def os_release(text: str) -> dict[str, str]:
    """KEY=value lines, values shell-quoted or not (os-release(5)); comments and bad lines are skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        try:
            parts = shlex.split(value)
        except ValueError:
            continue
        out[key] = " ".join(parts)
    return out


# --- /etc/waagent.conf ------------------------------------------------------------------------------------


def waagent_conf(text: str) -> dict[str, str]:
    """waagent's own reading: ``key=value`` lines not starting with '#', the value cut at a '#', quotes and
    blanks stripped; a later line wins."""
    out: dict[str, str] = {}
    for line in text.split("\n"):
        if line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.split("#")[0].strip("\" ").strip()
    return out


# --- cloud-init's datasource_list -------------------------------------------------------------------------


def _flow_items(text: str) -> list[str]:
    inner = text.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        raise ValueError(text)
    items = []
    for raw in inner[1:-1].split(","):
        item = raw.strip().strip("'\"").strip()
        if item:
            items.append(item)
    return items


def datasource_list(text: str) -> list[str] | None:
    """The ``datasource_list`` a cloud-init config file sets, or None when it sets none.

    Handles what these files hold: JSON (a JSON document is YAML), a flow list (``[ Azure, None ]``, also
    over several lines) and a block list (``- Azure`` lines).
    """
    import json

    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")).strip()
    if body.startswith("{"):
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            value = doc.get("datasource_list")
            return [str(x) for x in value] if isinstance(value, list) else None
        # a YAML flow mapping: {datasource_list: [Azure, None], ...}
        m = re.search(r"""[{,]\s*["']?datasource_list["']?\s*:\s*(\[[^\]]*\])""", body)
        return _flow_items(" ".join(m.group(1).split())) if m else None
    lines = text.splitlines()
    found: list[str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i].split(" #", 1)[0].rstrip()
        m = re.match(r"^datasource_list\s*:\s*(.*)$", line)
        i += 1
        if not m:
            continue
        rest = m.group(1).strip()
        if rest.startswith("["):
            while rest.count("[") > rest.count("]") and i < len(lines):
                rest += " " + lines[i].split(" #", 1)[0].strip()
                i += 1
            try:
                found = _flow_items(rest)
            except ValueError:
                found = None
        elif not rest:
            items = []
            while i < len(lines):
                item = re.match(r"^\s*-\s+(.*?)\s*$", lines[i].split(" #", 1)[0])
                if item:
                    items.append(item.group(1).strip("'\""))
                    i += 1
                elif not lines[i].strip() or lines[i].lstrip().startswith("#"):
                    i += 1
                else:
                    break
            found = items
    return found


def effective_datasource_list(files: Iterable[tuple[str, str]]) -> tuple[list[str] | None, str]:
    """cloud-init reads /etc/cloud/cloud.cfg, then cloud.cfg.d/*.cfg in name order; the last file that sets
    ``datasource_list`` wins. ``files``: (path, text) in that order. Returns (list or None, the file)."""
    value: list[str] | None = None
    where = ""
    for path, text in files:
        got = datasource_list(text)
        if got is not None:
            value, where = got, path
    return value, where


# --- the kernel command line ------------------------------------------------------------------------------


_GRUB_LINUX = re.compile(r"^\s*linux(?:16|efi)?\s+(\S+)\s*(.*)$")


def grub_cfg_cmdlines(text: str) -> list[str]:
    """The arguments of each ``linux`` line in a grub.cfg, in file order (the first is the default entry
    unless GRUB_DEFAULT says otherwise)."""
    out = []
    for line in text.splitlines():
        m = _GRUB_LINUX.match(line)
        if m:
            out.append(m.group(2).strip())
    return out


def default_grub_cmdline(texts: Iterable[str]) -> str:
    """GRUB_CMDLINE_LINUX then GRUB_CMDLINE_LINUX_DEFAULT from /etc/default/grub and /etc/default/grub.d/*.cfg
    (read in that order; a later assignment wins; ``$GRUB_CMDLINE_LINUX`` inside a value is expanded)."""
    values = {"GRUB_CMDLINE_LINUX": "", "GRUB_CMDLINE_LINUX_DEFAULT": ""}
    for text in texts:
        for line in text.splitlines():
            m = re.match(r"^\s*(?:export\s+)?(GRUB_CMDLINE_LINUX(?:_DEFAULT)?)=(.*)$", line)
            if not m:
                continue
            raw = m.group(2)
            for name, val in sorted(values.items(), key=lambda kv: -len(kv[0])):  # _DEFAULT first
                raw = raw.replace("${" + name + "}", val).replace("$" + name, val)
            try:
                values[m.group(1)] = " ".join(shlex.split(raw, comments=True))
            except ValueError:
                continue
    return " ".join(v for v in (values["GRUB_CMDLINE_LINUX"], values["GRUB_CMDLINE_LINUX_DEFAULT"]) if v)


def bls_options(text: str) -> str:
    """The ``options`` line of a Boot Loader Specification entry (/boot/loader/entries/*.conf)."""
    opts = [line.split(None, 1)[1] for line in text.splitlines()
            if line.startswith("options") and len(line.split(None, 1)) == 2]
    return " ".join(o.strip() for o in opts)


def extlinux_appends(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"(?im)^\s*append\s+(.*)$", text)]


def consoles(cmdline: str) -> list[str]:
    """The ``console=`` devices of a command line, e.g. ['tty1', 'ttyS0,115200n8']."""
    return [a.split("=", 1)[1] for a in cmdline.split() if a.startswith("console=")]


def has_serial_console(cmdline: str) -> bool:
    """Azure's serial console and boot diagnostics read COM1: ``console=ttyS0``."""
    return any(c == "ttyS0" or c.startswith("ttyS0,") for c in consoles(cmdline))


# --- initramfs: newc cpio archives, concatenated, each compressed or not ------------------------------------

_CPIO_MAGICS = (b"070701", b"070702")
CPIO_MAX_MEMBERS = 200_000


class InitramfsError(ValueError):
    """The file is not an initramfs this parser reads (named in the message)."""


def _decompress(data: bytes) -> tuple[bytes, bytes]:
    """The first compressed stream in ``data``, decompressed, and what follows it."""
    if data.startswith(b"\x1f\x8b"):
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            return d.decompress(data), d.unused_data
        except zlib.error as exc:
            raise InitramfsError(f"bad gzip data: {exc}") from None
    for magic, fmt in ((b"\xfd7zXZ\x00", lzma.FORMAT_XZ), (b"\x5d\x00\x00", lzma.FORMAT_ALONE)):
        if data.startswith(magic):
            x = lzma.LZMADecompressor(format=fmt)
            try:
                return x.decompress(data), x.unused_data
            except lzma.LZMAError as exc:
                raise InitramfsError(f"bad xz/lzma data: {exc}") from None
    if data.startswith(b"BZh"):
        b = bz2.BZ2Decompressor()
        try:
            return b.decompress(data), b.unused_data
        except OSError as exc:
            raise InitramfsError(f"bad bzip2 data: {exc}") from None
    for magic, argv in ((b"\x28\xb5\x2f\xfd", ["zstd", "-dcq"]), (b"\x02\x21\x4c\x18", ["lz4", "-dcq"]),
                        (b"\x04\x22\x4d\x18", ["lz4", "-dcq"])):
        if data.startswith(magic):
            try:
                res = subprocess.run(argv, input=data, capture_output=True, check=False)
            except FileNotFoundError:
                raise InitramfsError(f"compressed with {argv[0]}, which is not installed here") from None
            if res.returncode != 0 and not res.stdout:
                err = res.stderr.decode(errors="replace").strip()[:200]
                raise InitramfsError(f"{argv[0]} could not decompress it: {err}")
            return res.stdout, b""  # the tools decompress concatenated frames to the end
    raise InitramfsError(f"unknown data at an archive boundary (starts {data[:6].hex()})")


def cpio_names(data: bytes, _depth: int = 0) -> list[str]:
    """Every member name of the newc cpio archives in ``data``: plain archives (the early microcode cpio),
    then compressed ones (the main image), each until its ``TRAILER!!!``, zero padding in between."""
    names: list[str] = []
    pos = 0
    n = len(data)
    while pos < n:
        while pos < n and data[pos] == 0:
            pos += 1
        if pos >= n:
            break
        if data[pos:pos + 6] not in _CPIO_MAGICS:
            if _depth > 8:
                raise InitramfsError("too many nested compressed archives")
            inner, rest = _decompress(data[pos:])
            names += cpio_names(inner, _depth + 1)
            data, pos, n = rest, 0, len(rest)
            continue
        header = data[pos:pos + 110]
        if len(header) < 110:
            raise InitramfsError(f"truncated cpio header at byte {pos}")
        try:
            fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise InitramfsError(f"bad cpio header at byte {pos}") from None
        filesize, namesize = fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110:name_end - 1].decode(errors="replace")
        pos = (name_end + 3) & ~3
        pos = (pos + filesize + 3) & ~3
        if pos > n + 3:
            raise InitramfsError(f"truncated cpio member {name!r}")
        if name == "TRAILER!!!":
            continue
        names.append(name)
        if len(names) > CPIO_MAX_MEMBERS:
            raise InitramfsError(f"more than {CPIO_MAX_MEMBERS} members")
    return names


def module_names(names: Iterable[str]) -> set[str]:
    """Kernel module names (``hv_vmbus``) of the ``.ko`` files among archive or modules.builtin paths."""
    out = set()
    for name in names:
        base = name.rsplit("/", 1)[-1]
        m = re.match(r"^(.+?)\.ko(?:\.(?:xz|zst|gz))?$", base)
        if m:
            out.add(m.group(1).replace("-", "_"))
    return out


# --- VHD footer (Virtual Hard Disk Image Format Specification) -------------------------------------------

VHD_TYPES = {2: "fixed", 3: "dynamic", 4: "differencing"}


@dataclass(frozen=True)
class VhdFooter:
    disk_type: str  # fixed, dynamic, differencing, or "type N"
    current_size: int
    checksum_ok: bool
    creator: str


def vhd_footer(block: bytes) -> VhdFooter | None:
    """The footer in a 512-byte block (a VHD's last sector; a dynamic VHD copies it to its first), or
    None when the block has no ``conectix`` cookie."""
    if len(block) < 512 or block[:8] != b"conectix":
        return None
    current_size = struct.unpack_from(">Q", block, 48)[0]
    dtype = struct.unpack_from(">I", block, 60)[0]
    stored = struct.unpack_from(">I", block, 64)[0]
    total = sum(block[:64]) + sum(block[68:512])
    ok = (~total & 0xFFFFFFFF) == stored
    creator = block[28:32].decode("ascii", errors="replace").strip()
    return VhdFooter(VHD_TYPES.get(dtype, f"type {dtype}"), current_size, ok, creator)


# --- BIOS boot code --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootSector:
    code: bool  # boot code in the first 440 bytes
    loader: str  # "GRUB", "SYSLINUX", "unknown", or "" without code
    grub_core_sector: int | None  # where GRUB's boot.img loads core.img from


def boot_sector(sector: bytes) -> BootSector:
    code = bytes(sector[:440]).strip(b"\0") != b""
    if not code:
        return BootSector(False, "", None)
    if b"GRUB" in sector[:440]:
        (core,) = struct.unpack_from("<Q", sector, 0x5C)
        return BootSector(True, "GRUB", core)
    if b"SYSLINUX" in sector.upper() or b"EXTLINUX" in sector.upper():
        return BootSector(True, "SYSLINUX", None)
    return BootSector(True, "unknown", None)


# --- EFI binaries ----------------------------------------------------------------------------------------

PE_MACHINES = {0x8664: "x86_64", 0xAA64: "aarch64", 0x14C: "i386", 0x1C2: "arm"}


def pe_machine(head: bytes) -> str | None:
    """The machine a PE/COFF image (an EFI binary) is for, from its first KiB; None if it is not one."""
    if len(head) < 0x40 or head[:2] != b"MZ":
        return None
    (pe,) = struct.unpack_from("<I", head, 0x3C)
    if pe + 6 > len(head) or head[pe:pe + 4] != b"PE\0\0":
        return None
    (machine,) = struct.unpack_from("<H", head, pe + 4)
    return PE_MACHINES.get(machine, f"machine {machine:#x}")
