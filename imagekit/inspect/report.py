"""``inspect FILE``: what an image file holds, read offline, and what would make it fail to provision on Azure.

:func:`inspect_image` opens the file read-only (:mod:`imagekit.inspect.source`), reads the boot sectors, then
mounts its partitions read-only in a private mount namespace (:mod:`imagekit.inspect.worker`) and returns a
JSON-ready :class:`dict`; :func:`render` prints it for people. ``problems`` are what predict a provisioning
failure on Azure; ``notes`` are worth knowing but do not (a file that is not a fixed VHD: ``build``
converts it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from imagekit.config import distros as table
from imagekit.core.errors import HostError, InputError
from imagekit.core.paths import REPO_ROOT
from imagekit.core.run import require, run
from imagekit.inspect import fat, parse
from imagekit.inspect.source import ALLOWED, BIOS_BOOT_TYPE, MIB, Part, RawDisk, open_disk

FAMILIES = {"debian": "debian", "ubuntu": "ubuntu", "rhel": "rhel", "centos": "rhel", "fedora": "rhel",
            "almalinux": "rhel", "rocky": "rhel", "ol": "rhel", "sles": "suse", "opensuse-leap": "suse",
            "suse": "suse", "opensuse": "suse", "azurelinux": "azurelinux", "mariner": "azurelinux",
            "flatcar": "flatcar"}
WAAGENT_KEYS = ("Provisioning.Agent", "Provisioning.Enabled", "Provisioning.UseCloudInit", "ResourceDisk.Format",
                "ResourceDisk.Filesystem", "ResourceDisk.MountPoint", "ResourceDisk.EnableSwap",
                "ResourceDisk.SwapSizeMB")
WAAGENT_UNITS = ("walinuxagent.service", "waagent.service")
CLOUD_INIT_UNITS = ("cloud-init-local.service", "cloud-init.service", "cloud-init-main.service",
                    "cloud-init-network.service", "cloud-config.service", "cloud-final.service")
HV_MODULES = ("hv_vmbus", "hv_storvsc", "hv_netvsc")
FALLBACK_EFI = "/efi/boot/bootx64.efi"


def _need_root() -> None:
    require("unshare", "mount", "umount", "sfdisk", "blkid", "qemu-img")
    if os.geteuid() != 0:
        raise HostError("reading an image's file systems mounts them read-only through loop devices and needs root")


def read_tree(disk: RawDisk, deep: bool = True) -> dict[str, Any]:
    """Run the worker over ``disk``'s partitions in a private mount namespace; its facts as a dict."""
    assert disk.workdir is not None
    job = {"image": str(disk.raw), "mountpoint": str(disk.workdir / "mnt"), "deep": deep,
           "parts": [p.as_dict() for p in disk.parts]}
    res = run(["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m",
               "imagekit.inspect.worker"], input=json.dumps(job), env={"PYTHONPATH": str(REPO_ROOT)}, timeout=1800)
    facts: dict[str, Any] = json.loads(res.stdout)
    return facts


def efi_files(disk: RawDisk) -> dict[str, list[dict[str, Any]]]:
    """The .efi binaries (with the machine each is for) and grub.cfg files under EFI/ of each FAT partition."""
    out: dict[str, list[dict[str, Any]]] = {}
    with open(disk.raw, "rb") as fh:
        for p in disk.parts:
            if p.fstype != "vfat":
                continue
            files: list[dict[str, Any]] = []
            try:
                fs = fat.Fat(fh, p.offset, p.size)
                for e in fs.walk():
                    low = e.path.lower()
                    if e.is_dir or not low.startswith("/efi/"):
                        continue
                    if low.endswith(".efi"):
                        files.append({"path": e.path, "machine": parse.pe_machine(fs.read(e, 4096))})
                    elif low.endswith("/grub.cfg"):
                        files.append({"path": e.path, "machine": None,
                                      "text": fs.read(e, 1 << 20).decode(errors="replace")})
            except fat.FatError as exc:
                files.append({"path": "", "machine": None, "error": str(exc)})
            out[str(p.number)] = files
    return out


def require_linux_root(disk: RawDisk, facts: dict[str, Any]) -> None:
    if facts.get("root") is not None:
        return
    fs = ", ".join(f"{p.fstype or 'no file system'} ({'partition ' + str(p.number) if p.number else 'whole disk'})"
                   for p in disk.parts)
    errors = "; ".join(f"partition {n}: {e}" for n, e in facts.get("errors", {}).items())
    if any(p.fstype in ("LVM2_member", "crypto_LUKS", "linux_raid_member") for p in disk.parts):
        errors += ("; " if errors else "") + "LVM, LUKS and RAID members are not read: their file systems are not seen"
    raise InputError(f"{disk.info.path}: no Linux root file system found (found: {fs}"
                     + (f"; {errors}" if errors else "")
                     + f"); allowed: {ALLOWED} (a file system with /etc/os-release)")


# --- pieces of the report ------------------------------------------------------------------------------------


def _boot(disk: RawDisk, efi: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    with open(disk.raw, "rb") as fh:
        sector0 = fh.read(512)
    bs = parse.boot_sector(sector0)
    bios: dict[str, Any] = {"ok": False, "loader": bs.loader, "detail": ""}
    first = min((p.offset for p in disk.parts if p.number), default=0) // 512
    bios_part = next((p for p in disk.parts if p.type.upper() == BIOS_BOOT_TYPE), None)
    if not bs.code:
        bios["detail"] = "no boot code in the MBR"
    elif bs.loader == "GRUB" and bs.grub_core_sector is not None:
        core = bs.grub_core_sector
        with open(disk.raw, "rb") as fh:
            fh.seek(core * 512)
            data = fh.read(512)
        where = ""
        if 0 < core < first:
            where = "in the gap before the first partition"
        elif bios_part is not None and bios_part.offset // 512 <= core < (bios_part.offset + bios_part.size) // 512:
            where = f"in the BIOS boot partition (partition {bios_part.number})"
        if where and data.strip(b"\0"):
            bios.update(ok=True, detail=f"GRUB boot code in the MBR, its core image at sector {core} {where}")
        else:
            bios["detail"] = f"GRUB boot code in the MBR, but no core image at sector {core}"
    else:
        bios.update(ok=True, detail=f"{bs.loader} boot code in the MBR (its next stage not verified)")
    uefi: dict[str, Any] = {"ok": False, "detail": "no EFI system partition", "esp": None, "loaders": []}
    esps = [p for p in disk.parts if p.is_esp]
    for p in esps:
        files = [f for f in efi.get(str(p.number), []) if f.get("machine")]
        uefi["esp"] = p.number
        uefi["loaders"] = [f["path"] for f in files]
        x64 = [f for f in files if f["machine"] == "x86_64"]
        fallback = [f for f in x64 if f["path"].lower() == FALLBACK_EFI]
        if fallback:
            uefi.update(ok=True, detail=f"EFI system partition {p.number} with {fallback[0]['path']} (x86_64)")
            break
        if x64:
            names = ", ".join(f["path"] for f in x64)
            uefi.update(ok=True, detail=f"EFI system partition {p.number} with {names} (x86_64; no "
                        f"{FALLBACK_EFI.upper().replace('/EFI/BOOT', '/EFI/BOOT')}: needs a boot entry)")
            break
        uefi["detail"] = (f"EFI system partition {p.number} ({p.fstype or 'no file system'}) without an x86_64 "
                          "boot loader")
    modes = [m for m, d in (("bios", bios), ("uefi", uefi)) if d["ok"]]
    return {"modes": modes, "bios": bios, "uefi": uefi,
            "azure_generations": [g for g, m in ((1, "bios"), (2, "uefi")) if m in modes]}


def _cmdline(configs: dict[str, str], efi: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The kernel command line the boot loader passes, from the first source that has one."""
    candidates: list[tuple[str, str]] = []
    for path in ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg"):
        lines = parse.grub_cfg_cmdlines(configs.get(path, ""))
        if lines:
            candidates.append((path, lines[0]))
    for files in efi.values():
        for f in files:
            if "text" in f:
                lines = parse.grub_cfg_cmdlines(f["text"])
                if lines:
                    candidates.append((f"EFI system partition {f['path']}", lines[0]))
    bls = sorted(p for p in configs if p.startswith("/boot/loader/entries/"))
    for path in bls:
        opts = parse.bls_options(configs[path])
        if opts:
            candidates.append((path, opts))
            break
    for path in ("/boot/extlinux/extlinux.conf", "/extlinux.conf", "/boot/syslinux/syslinux.cfg"):
        appends = parse.extlinux_appends(configs.get(path, ""))
        if appends:
            candidates.append((path, appends[0]))
    if "/etc/kernel/cmdline" in configs:
        candidates.append(("/etc/kernel/cmdline", " ".join(configs["/etc/kernel/cmdline"].split())))
    grub_defaults = [configs["/etc/default/grub"]] if "/etc/default/grub" in configs else []
    grub_defaults += [configs[p] for p in sorted(configs) if p.startswith("/etc/default/grub.d/")]
    if grub_defaults:
        candidates.append(("/etc/default/grub", parse.default_grub_cmdline(grub_defaults)))
    if not candidates:
        return {"source": "", "cmdline": "", "serial_console": False, "rootdelay": None, "consoles": []}
    source, line = candidates[0]
    rootdelay = next((a.split("=", 1)[1] for a in line.split() if a.startswith("rootdelay=")), None)
    return {"source": source, "cmdline": line, "consoles": parse.consoles(line),
            "serial_console": parse.has_serial_console(line), "rootdelay": rootdelay}


def _enabled(units: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    present = [u for u in names if units.get(u, {}).get("present")]
    masked = [u for u in names if units.get(u, {}).get("masked")]
    enabled = {u: units[u]["wanted_by"] for u in names if units.get(u, {}).get("wanted_by")}
    return {"units": present, "masked": masked, "enabled": enabled}


def _agents(facts: dict[str, Any], cmdline: str) -> dict[str, Any]:
    units = facts.get("units", {})
    wa = facts.get("waagent", {})
    ci = facts.get("cloud_init", {})
    conf = parse.waagent_conf(wa["conf"]) if wa.get("conf") is not None else {}
    waagent = {"installed": bool(wa.get("binaries")), "binaries": wa.get("binaries", []),
               "conf": "/etc/waagent.conf" if wa.get("conf") is not None else "",
               "settings": {k: conf[k] for k in WAAGENT_KEYS if k in conf}, **_enabled(units, WAAGENT_UNITS)}
    dsl, where = parse.effective_datasource_list([tuple(x) for x in ci.get("configs", [])])
    cloud_init = {"installed": bool(ci.get("binaries")), "binaries": ci.get("binaries", []),
                  "datasource_list": dsl, "datasource_list_from": where,
                  "disabled": ci.get("disabled_file", False) or "cloud-init=disabled" in cmdline.split(),
                  **_enabled(units, CLOUD_INIT_UNITS)}
    # Who provisions: waagent.conf's Provisioning.Agent (2.2.40 and later; default auto), else the older
    # Provisioning.Enabled / Provisioning.UseCloudInit keys.
    provisioner = None
    if waagent["installed"]:
        pa = conf.get("Provisioning.Agent", "").lower()
        if pa == "waagent":
            provisioner = "waagent"
        elif pa == "cloud-init":
            provisioner = "cloud-init"
        elif pa == "disabled":
            provisioner = None
        elif pa in ("auto", ""):
            if not pa and conf.get("Provisioning.Enabled", "y").lower() == "n":
                provisioner = "cloud-init" if cloud_init["installed"] else None
            elif cloud_init["installed"]:
                provisioner = "cloud-init"
            else:
                provisioner = "waagent"
    elif cloud_init["installed"]:
        provisioner = "cloud-init"
    return {"waagent": waagent, "cloud_init": cloud_init, "provisioning": provisioner,
            "waagent_provisioning_agent": conf.get("Provisioning.Agent", "")}


def _kernels(facts: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for k in facts.get("kernels", []):
        have = sorted(set(k.get("in_initramfs", [])) | set(k.get("builtin", [])))
        out.append({"version": k["version"], "kernel": k["kernel"], "initramfs": k["initramfs"],
                    "hyperv_drivers": {m: ("built in" if m in k.get("builtin", []) else
                                           "in the initramfs" if m in k.get("in_initramfs", []) else "missing")
                                       for m in HV_MODULES},
                    "hyperv_ok": all(m in have for m in HV_MODULES), "initramfs_error": k.get("initramfs_error", "")})
    return sorted(out, key=lambda k: _version_key(k["version"]), reverse=True)


def _version_key(v: str) -> list[Any]:
    import re

    return [(0, int(x)) if x.isdigit() else (1, x) for x in re.split(r"[.\-+~_]", v)]


def _match(osr: dict[str, str], provisioner: str | None) -> dict[str, Any]:
    """The table entry for this OS: family and version from os-release, then the agent that provisions."""
    import re

    ids = [osr.get("ID", "").lower(), *osr.get("ID_LIKE", "").lower().split()]
    family = next((FAMILIES[i] for i in ids if i in FAMILIES), "")
    version = osr.get("VERSION_ID", "")
    if not family:
        return {"id": None, "exact": False, "why": f"no family in the table for ID={osr.get('ID', '')!r}"}

    def norm(s: str) -> str:
        return re.sub(r"[^a-z0-9]", "", s.lower())

    same = sorted((d for d in table.default_table().values()
                   if d.family.value == family and (d.version == version or version.split(".")[0] == d.version
                                                    or version.startswith(d.version + "."))),
                  key=lambda d: (len(d.id), d.id))
    if len(same) > 1:  # one family, several distributions (AlmaLinux, Rocky, RHEL, Oracle Linux)
        own = [d for d in same if norm(d.name).startswith(norm(osr.get("ID", "")))
               or norm(osr.get("NAME", "")).startswith(norm(d.name.split()[0]))]
        same = own or same
    if not same:
        return {"id": None, "exact": False,
                "why": f"no entry for family {family} version {version or '(none)'} in the table"}
    agent = [d for d in same if provisioner and d.agent.value == provisioner]
    if agent:
        return {"id": agent[0].id, "exact": True,
                "why": f"family {family}, version {agent[0].version}, agent {provisioner}"}
    ids_ = ", ".join(d.id for d in same)
    return {"id": same[0].id, "exact": False,
            "why": f"family {family} and version match {ids_}, but the agent ({provisioner or 'none'}) does not"}


def _diagnose(r: dict[str, Any]) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    notes: list[str] = []
    img = r["image"]
    if not img["azure_ready"]:
        why = (f"virtual size {img['virtual_size']} bytes is not a whole number of MiB"
               if img["format"] == "vpc" and img["subformat"] == "fixed" else f"a {img['label']} file")
        notes.append(f"not a file Azure takes as it is ({why}; Azure wants a fixed VHD of a whole number of MiB): "
                     "build converts it")
    if not r["boot"]["modes"]:
        problems.append(f"no boot mode: {r['boot']['bios']['detail']}; {r['boot']['uefi']['detail']}")
    a = r["agents"]
    wa, ci = a["waagent"], a["cloud_init"]
    if not wa["installed"] and not ci["installed"]:
        problems.append("no provisioning agent installed (neither waagent nor cloud-init): the VM never reports "
                        "Ready and Azure's provisioning times out")
    prov = a["provisioning"]
    if wa["installed"] and a["waagent_provisioning_agent"] == "cloud-init" and not ci["installed"]:
        problems.append("waagent.conf has Provisioning.Agent=cloud-init, but cloud-init is not installed")
    if wa["installed"] and not prov and not ci["installed"]:
        problems.append(f"waagent does not provision (Provisioning.Agent={a['waagent_provisioning_agent']}) and no "
                        "other agent is installed")
    if prov == "cloud-init":
        dsl = ci["datasource_list"]
        if dsl is not None and "Azure" not in dsl:
            problems.append(f"cloud-init's datasource_list ({ci['datasource_list_from']}) is {dsl}, without Azure: "
                            "cloud-init will not read the provisioning data")
        if dsl is None:
            notes.append("no datasource_list in cloud-init's configuration: its built-in list (which has Azure) "
                         "is used")
        if ci["disabled"]:
            problems.append("cloud-init is disabled (/etc/cloud/cloud-init.disabled or cloud-init=disabled)")
        if ci["masked"]:
            problems.append(f"cloud-init is masked: {', '.join(ci['masked'])}")
        elif not ci["enabled"]:
            problems.append("cloud-init's units are not enabled (no link in a systemd .wants directory): it "
                            "does not run at boot")
    if wa["installed"] and (prov == "waagent" or prov is None or prov == "cloud-init"):
        if wa["masked"]:
            problems.append(f"waagent is masked: {', '.join(wa['masked'])}")
        elif wa["units"] and not wa["enabled"]:
            problems.append(f"waagent's unit {wa['units'][0]} is not enabled (no link in a systemd .wants "
                            "directory)" + (": it provisions this image" if prov == "waagent" else
                                            ": Ready is reported, but extensions never run"))
    if prov == "cloud-init" and wa.get("settings", {}).get("ResourceDisk.Format", "n").lower() == "y":
        notes.append("waagent.conf has ResourceDisk.Format=y while cloud-init provisions: two owners of the "
                     "resource disk")
    if prov == "waagent" and ci["installed"] and ci["enabled"] and not ci["disabled"]:
        notes.append("cloud-init is installed and enabled beside waagent, which provisions: they may both act")
    kernels = r["kernels"]
    if not kernels:
        problems.append("no kernel in /boot")
    elif not kernels[0]["hyperv_ok"]:
        k = kernels[0]
        missing = [m for m, s in k["hyperv_drivers"].items() if s == "missing"]
        why = f" ({k['initramfs_error']})" if k["initramfs_error"] else ""
        problems.append(f"kernel {k['version']}: {', '.join(missing)} neither built in nor in its initramfs "
                        f"{k['initramfs'] or '(none found)'}{why}: the root disk and NIC behind Hyper-V are not "
                        "found at boot")
    cl = r["kernel_cmdline"]
    if not cl["source"]:
        problems.append("no kernel command line found (grub.cfg, BLS entries, extlinux.conf, /etc/default/grub)")
    elif not cl["serial_console"]:
        problems.append(f"no serial console on the kernel command line ({cl['source']}): console=ttyS0 is missing, "
                        "so Azure's boot diagnostics and serial console show nothing")
    if r["distro"]["id"] is None:
        notes.append(f"no matching distro entry: {r['distro']['why']}")
    return problems, notes


def _mounted_at(p: Part, facts: dict[str, Any]) -> str:
    """Where the image's fstab mounts the partition ("/" for the root), or ""."""
    from imagekit.scan.image import Partition, fstab_mounts, matches

    if p.number == facts.get("root"):
        return "/"
    for mountpoint, n in facts.get("mounted", {}).items():
        if n == p.number:
            return str(mountpoint)
    part = Partition(p.offset, p.size, p.fstype, p.uuid, p.label, p.partuuid)
    return next((m for src, m in fstab_mounts(facts.get("fstab", "")) if matches(src, part)), "")


def inspect_image(path: Path, workdir: Path | None = None) -> dict[str, Any]:
    """Everything :mod:`imagekit.inspect` reports about ``path`` (JSON-ready)."""
    _need_root()
    with open_disk(path, workdir) as disk:
        facts = read_tree(disk, deep=True)
        require_linux_root(disk, facts)
        info = disk.info
        efi = efi_files(disk)
        osr = parse.os_release(facts.get("os_release", ""))
        cmdline = _cmdline(facts.get("boot_configs", {}), efi)
        agents = _agents(facts, cmdline["cmdline"])
        report: dict[str, Any] = {
            "image": {"path": str(path), "format": info.format, "subformat": info.subformat, "label": info.label,
                      "virtual_size": info.virtual_size, "file_size": info.file_size,
                      "whole_mib": info.virtual_size % MIB == 0, "azure_ready": info.azure_ready},
            "partition_table": disk.table or "none",
            "partitions": [{**p.as_dict(), "mounted_at": _mounted_at(p, facts)} for p in disk.parts],
            "boot": _boot(disk, efi),
            "os": {k: osr.get(k, "") for k in ("ID", "VERSION_ID", "PRETTY_NAME", "ID_LIKE")},
            "agents": agents,
            "kernels": _kernels(facts),
            "kernel_cmdline": cmdline,
            "distro": _match(osr, agents["provisioning"]),
        }
    report["problems"], report["notes"] = _diagnose(report)
    return report


# --- the readable summary ------------------------------------------------------------------------------------


def _size(n: int) -> str:
    if n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    if n % MIB == 0:
        return f"{n >> 20} MiB"
    return f"{n / MIB:.2f} MiB ({n} bytes)"


def render(r: dict[str, Any]) -> str:
    img = r["image"]
    lines = [f"image      {img['path']}",
             f"format     {img['label']}, virtual {_size(img['virtual_size'])}; Azure takes it as is: "
             + ("yes" if img["azure_ready"] else "no (build converts it)")]
    lines.append(f"partitions {r['partition_table'].upper() if r['partition_table'] != 'none' else 'none'}")
    for p in r["partitions"]:
        where = f" mounted at {p['mounted_at']}" if p["mounted_at"] else ""
        label = f" label {p['label']!r}" if p["label"] else ""
        lines.append(f"  {p['number'] or '-':>2}  {_size(p['offset']) + ' +':>12} {_size(p['size']):>9}  "
                     f"{p['type_name']:<18} {p['fstype'] or '-'}{label}{where}")
    b = r["boot"]
    gens = ", ".join(f"generation {g}" for g in b["azure_generations"]) or "none"
    lines.append(f"boot       {', '.join(m.upper() for m in b['modes']) or 'none'} (Azure {gens})")
    lines.append(f"  BIOS: {b['bios']['detail']}")
    lines.append(f"  UEFI: {b['uefi']['detail']}")
    o = r["os"]
    lines.append(f"os         {o['PRETTY_NAME'] or '(no PRETTY_NAME)'} (ID={o['ID']}, VERSION_ID={o['VERSION_ID']})")
    a = r["agents"]
    wa, ci = a["waagent"], a["cloud_init"]
    lines.append(f"agents     provisioning by {a['provisioning'] or 'nobody'}")
    if wa["installed"]:
        s = ", ".join(f"{k}={v}" for k, v in wa["settings"].items()) or "no settings read"
        en = _unit_state(wa)
        lines.append(f"  waagent: {', '.join(wa['binaries'])}; {wa['conf'] or 'no /etc/waagent.conf'}: {s}; {en}")
    else:
        lines.append("  waagent: not installed")
    if ci["installed"]:
        dsl = (f"datasource_list {ci['datasource_list']} from {ci['datasource_list_from']}"
               if ci["datasource_list"] is not None else "no datasource_list (the built-in list)")
        dis = "; disabled" if ci["disabled"] else ""
        lines.append(f"  cloud-init: {', '.join(ci['binaries'])}; {dsl}; {_unit_state(ci)}{dis}")
    else:
        lines.append("  cloud-init: not installed")
    lines.append("kernels")
    for k in r["kernels"]:
        hv = ", ".join(f"{m} {s}" for m, s in k["hyperv_drivers"].items())
        err = f" ({k['initramfs_error']})" if k["initramfs_error"] else ""
        lines.append(f"  {k['version']}: initramfs {k['initramfs'] or '(none)'}{err}; {hv}")
    if not r["kernels"]:
        lines.append("  (none in /boot)")
    cl = r["kernel_cmdline"]
    if cl["source"]:
        extra = f"; rootdelay={cl['rootdelay']}" if cl["rootdelay"] else "; no rootdelay"
        lines.append(f"cmdline    {cl['cmdline']}")
        lines.append(f"  from {cl['source']}; serial console: {'yes' if cl['serial_console'] else 'no'}{extra}")
    else:
        lines.append("cmdline    (not found)")
    d = r["distro"]
    lines.append(f"distro     {d['id'] or 'no match'}" + ("" if d["exact"] else " (closest)" if d["id"] else "")
                 + f": {d['why']}")
    if r["problems"]:
        lines.append(f"problems ({len(r['problems'])}): this image would fail to provision on Azure")
        lines += [f"  - {p}" for p in r["problems"]]
    else:
        lines.append("problems   none found")
    if r["notes"]:
        lines.append("notes")
        lines += [f"  - {n}" for n in r["notes"]]
    return "\n".join(lines)


def _unit_state(agent: dict[str, Any]) -> str:
    if agent["masked"]:
        return f"masked ({', '.join(agent['masked'])})"
    if agent["enabled"]:
        by: dict[str, list[str]] = {}
        for unit, dirs in agent["enabled"].items():
            for d in dirs:
                by.setdefault(d.rsplit("/", 1)[-1], []).append(unit)
        return "enabled: " + "; ".join(f"{', '.join(u)} in {d}" for d, u in by.items())
    if agent["units"]:
        return f"not enabled ({', '.join(agent['units'])})"
    return "no systemd unit"
