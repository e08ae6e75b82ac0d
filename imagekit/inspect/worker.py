"""The inspection's worker: runs as ``python -m imagekit.inspect.worker`` inside ``unshare --mount`` (a private
mount namespace that dies with it, taking its mounts and auto-clearing loop devices along), reads its job as
JSON on stdin, mounts every partition read-only (``ro,noload`` for ext4, ``ro,norecovery`` for xfs: not even
a journal is replayed), puts them together as the image's /etc/fstab says, and writes what it read as JSON
on stdout. Paths inside the image are resolved inside it (its absolute links point into the image, never at
the host). Parsing is left to the caller (:mod:`imagekit.inspect.parse`), so it is tested without mounts.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from imagekit.core.run import run
from imagekit.inspect import parse

MOUNTABLE = ("ext2", "ext3", "ext4", "xfs", "btrfs")  # FAT is read in user space (imagekit.inspect.fat)
MAX_TEXT = 1 << 20
MAX_INITRD = 512 << 20
AGENT_UNITS = ("walinuxagent.service", "waagent.service", "cloud-init-local.service", "cloud-init.service",
               "cloud-init-main.service", "cloud-init-network.service", "cloud-config.service",
               "cloud-final.service", "cloud-init.target")
UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")
HV_MODULES = ("hv_vmbus", "hv_storvsc", "hv_netvsc")


def resolve(root: Path, path: str, *, follow_last: bool = True) -> Path | None:
    """``path`` inside the tree at ``root``, following symlinks as the image would (absolute targets
    restart at ``root``, '..' stops at it); None when a link loops or a component is missing."""
    parts = [p for p in path.split("/") if p and p != "."]
    cur = root
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            cur = cur.parent if cur != root else root
            continue
        nxt = cur / name
        try:
            st = nxt.lstat()
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode) and (parts or follow_last):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = root
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        cur = nxt
    return cur


def read_text(root: Path, path: str) -> str | None:
    p = resolve(root, path)
    if p is None or not p.is_file():
        return None
    try:
        with p.open("rb") as fh:
            return fh.read(MAX_TEXT).decode(errors="replace")
    except OSError:
        return None


def exists(root: Path, path: str) -> bool:
    p = resolve(root, path)
    return p is not None and (p.is_file() or p.is_dir())


def listdir(root: Path, path: str) -> list[str]:
    p = resolve(root, path)
    if p is None or not p.is_dir():
        return []
    try:
        return sorted(e.name for e in p.iterdir())
    except OSError:
        return []


def _texts(root: Path, directory: str, suffix: str) -> list[tuple[str, str]]:
    out = []
    for name in listdir(root, directory):
        if name.endswith(suffix):
            text = read_text(root, f"{directory}/{name}")
            if text is not None:
                out.append((f"/{directory}/{name}", text))
    return out


def units(root: Path) -> dict[str, Any]:
    """Each agent unit: whether its unit file exists, whether it is masked, and the .wants links to it."""
    seen_dirs: set[Path] = set()
    wants: dict[str, list[str]] = {u: [] for u in AGENT_UNITS}
    present: dict[str, bool] = dict.fromkeys(AGENT_UNITS, False)
    masked: dict[str, bool] = dict.fromkeys(AGENT_UNITS, False)
    for d in UNIT_DIRS:
        real = resolve(root, d)
        if real is None or not real.is_dir() or real in seen_dirs:
            continue
        seen_dirs.add(real)
        for u in AGENT_UNITS:
            f = real / u
            if f.is_symlink():
                target = os.readlink(f)
                if target == "/dev/null":
                    masked[u] = True
                    continue
            if resolve(root, f"{d}/{u}") is not None and exists(root, f"{d}/{u}"):
                present[u] = True
        for wd in sorted(real.glob("*.wants")) + sorted(real.glob("*.requires")):
            for u in AGENT_UNITS:
                if (wd / u).is_symlink() or (wd / u).exists():
                    wants[u].append(f"/{d}/{wd.name}")
    return {u: {"present": present[u], "masked": masked[u], "wanted_by": wants[u]} for u in AGENT_UNITS}


def _initrd_for(root: Path, kver: str) -> str:
    for name in (f"initrd.img-{kver}", f"initramfs-{kver}.img", f"initrd-{kver}", f"initramfs-{kver}",
                 f"initrd-{kver}.img"):
        if exists(root, f"boot/{name}"):
            return f"/boot/{name}"
    return ""


def kernels(root: Path, deep: bool) -> list[dict[str, Any]]:
    out = []
    for name in listdir(root, "boot"):
        if not (name.startswith("vmlinuz-") or name.startswith("vmlinux-")):
            continue
        kver = name.split("-", 1)[1]
        entry: dict[str, Any] = {"version": kver, "kernel": f"/boot/{name}", "initramfs": _initrd_for(root, kver),
                                 "builtin": [], "in_initramfs": [], "initramfs_error": ""}
        builtin = read_text(root, f"lib/modules/{kver}/modules.builtin") or ""
        entry["builtin"] = sorted(parse.module_names(builtin.splitlines()) & set(HV_MODULES))
        if deep and entry["initramfs"]:
            p = resolve(root, entry["initramfs"])
            try:
                assert p is not None
                if p.stat().st_size > MAX_INITRD:
                    raise parse.InitramfsError(f"larger than {MAX_INITRD >> 20} MiB")
                names = parse.cpio_names(p.read_bytes())
                mods = parse.module_names(names)
                entry["in_initramfs"] = sorted(mods & set(HV_MODULES))
                entry["initramfs_modules"] = len(mods)
            except (OSError, parse.InitramfsError, AssertionError) as exc:
                entry["initramfs_error"] = str(exc) or "unreadable"
        out.append(entry)
    return out


def boot_configs(root: Path) -> dict[str, str]:
    """Where the kernel command line can come from: each file's text, by its path in the image."""
    out: dict[str, str] = {}
    for rel in ("boot/grub/grub.cfg", "boot/grub2/grub.cfg", "etc/default/grub", "boot/grub2/grubenv",
                "boot/extlinux/extlinux.conf", "boot/syslinux/syslinux.cfg", "extlinux.conf", "etc/kernel/cmdline"):
        text = read_text(root, rel)
        if text is not None:
            out["/" + rel] = text
    for path, text in _texts(root, "etc/default/grub.d", ".cfg") + _texts(root, "boot/loader/entries", ".conf"):
        out[path] = text
    return out


def root_facts(root: Path, deep: bool) -> dict[str, Any]:
    waagent_bins = [p for p in ("usr/sbin/waagent", "usr/bin/waagent") if exists(root, p)]
    cloud_bins = [p for p in ("usr/bin/cloud-init",) if exists(root, p)]
    cloud_cfgs = []
    main_cfg = read_text(root, "etc/cloud/cloud.cfg")
    if main_cfg is not None:
        cloud_cfgs.append(("/etc/cloud/cloud.cfg", main_cfg))
    cloud_cfgs += _texts(root, "etc/cloud/cloud.cfg.d", ".cfg")
    return {
        "os_release": read_text(root, "etc/os-release") or read_text(root, "usr/lib/os-release") or "",
        "fstab": read_text(root, "etc/fstab") or "",
        "waagent": {"binaries": ["/" + p for p in waagent_bins], "conf": read_text(root, "etc/waagent.conf")},
        "cloud_init": {"binaries": ["/" + p for p in cloud_bins], "configs": cloud_cfgs,
                       "disabled_file": exists(root, "etc/cloud/cloud-init.disabled")},
        "units": units(root),
        "kernels": kernels(root, deep),
        "boot_configs": boot_configs(root),
    }


def main() -> int:
    from imagekit.scan.image import Partition, fstab_mounts, matches, mount_options

    job = json.loads(sys.stdin.read())
    mnt = Path(job["mountpoint"])
    deep = bool(job.get("deep", True))
    parts = job["parts"]
    result: dict[str, Any] = {"mounted": {}, "errors": {}, "root": None}
    mounted: list[Path] = []
    try:
        dirs: dict[int, Path] = {}
        for p in parts:
            if p["fstype"] not in MOUNTABLE:
                continue
            d = mnt / f"p{p['number']}"
            d.mkdir(parents=True, exist_ok=True)
            opts = f"{mount_options(p['fstype'])},loop,offset={p['offset']},sizelimit={p['size']}"
            res = run(["mount", "-t", p["fstype"], "-o", opts, job["image"], d], check=False)
            if res.returncode != 0:
                result["errors"][str(p["number"])] = (res.stderr.strip().splitlines() or ["mount failed"])[-1]
                continue
            mounted.append(d)
            dirs[p["number"]] = d
        roots = [n for n, d in dirs.items()
                 if (read_text(d, "etc/os-release") or read_text(d, "usr/lib/os-release")) and exists(d, "etc")]
        if roots:
            num = roots[0]
            root = dirs[num]
            result["root"] = num
            result["roots"] = roots
            fstab = read_text(root, "etc/fstab") or ""
            others = [n for n in dirs if n != num]
            for source, mountpoint in fstab_mounts(fstab):
                target = resolve(root, mountpoint)
                for n in list(others):
                    p = next(x for x in parts if x["number"] == n)
                    part = Partition(p["offset"], p["size"], p["fstype"], p["uuid"], p["label"], p["partuuid"])
                    if matches(source, part) and target is not None and target.is_dir() and not target.is_symlink():
                        run(["mount", "--bind", dirs[n], target])
                        mounted.append(target)
                        result["mounted"][mountpoint] = n
                        others.remove(n)
                        break
            result.update(root_facts(root, deep))
    finally:
        for d in reversed(mounted):
            run(["umount", d], check=False)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
