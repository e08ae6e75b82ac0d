"""Resource disk and swap: the agent's own handling of the temporary disk, and no swap on the OS disk.

The evidence of every resource-disk check states what the run exercised and what it bypassed (the
Hyper-V VMBus lookup under QEMU), from the set-up's note in the context's facts.
"""

from __future__ import annotations

import shlex

from imagekit.checks.probes import (
    backing_device,
    disk_of,
    expected_resource_disk,
    file_text,
    if_exists,
    mount_at,
    os_disk,
    resource_disk,
    resource_plan,
    swaps,
    topology,
)
from imagekit.checks.registry import ABSENT, CheckContext, CheckResult, Checks, Evidence, failed, passed, skipped
from imagekit.config.distros import Agent

README = "DATALOSS_WARNING_README.txt"
# waagent's swap-file lines, including its dd result ("dd unsuccessful" does not say "swap").
SWAP_LOG = "grep -iE 'swap|dd (un)?successful' /var/log/waagent.log | tail -n 15"
# Names under which a resource disk may legitimately appear in /etc/fstab (Azure's udev links, ours).
RESOURCE_DISK_NAMES = ("/dev/disk/azure/resource", "/dev/disk/cloud/azure_resource")

CHECKS = Checks()


def readme_cmd(path: str) -> str:
    q = shlex.quote(path)
    return if_exists(path, f"ls -l {q} && head -n 3 {q} && findmnt -n -o SOURCE --target {q}")


def swapfile_cmd(path: str) -> str:
    q = shlex.quote(path)
    return if_exists(path, f"stat -c '%n %s bytes mode %a' {q} && findmnt -n -o SOURCE --target {q}")


def _note(ctx: CheckContext) -> str:
    note = ctx.facts.get("resource_disk_note") or resource_plan(ctx).note
    timeout = ctx.facts.get("resource_disk_timeout")
    text = f"[what ran] {note}"
    if timeout:
        text += f"\n[set-up] {timeout}"
    return text


@CHECKS.add(
    "resource-disk.mounted",
    title="Resource disk mounted as configured",
    verifies="The resource disk is mounted at the configured mount point with the configured filesystem, "
    "from a partition of the resource disk and not of the OS disk, because workloads and the swap file "
    "rely on that temporary disk being where the image's configuration says.",
    source="waagent.conf ResourceDisk.Format/MountPoint/Filesystem; cloud-init disk_setup/fs_setup/mounts; "
    "LISA resource-disk tests (mounted)",
)
def mounted(ctx: CheckContext) -> CheckResult:
    exp, conf_ev = expected_resource_disk(ctx)
    if not exp.formatted:
        return skipped(f"resource disk handling is off ({exp.source}: ResourceDisk.Format is not y)", *conf_ev)
    rdisk, rd_ev = resource_disk(ctx)
    osd, os_ev = os_disk(ctx)
    mnt, mnt_ev = mount_at(ctx, exp.mount_point)
    evidence: list[Evidence] = [_note(ctx), *conf_ev, rd_ev, mnt_ev, *os_ev]
    if rdisk is None:
        return failed(f"the resource disk {resource_plan(ctx).device} is not present in the guest", *evidence)
    if mnt is None:
        return failed(f"nothing is mounted at {exp.mount_point} (configured by {exp.source})", *evidence)
    source, fstype = mnt.source, mnt.fstype
    on_disk = disk_of(ctx, source)
    problems = []
    if on_disk == osd and osd is not None:
        problems.append(f"{exp.mount_point} is on the OS disk {osd}")
    elif on_disk != rdisk:
        problems.append(f"{exp.mount_point} comes from {source} (disk {on_disk}), not the resource disk {rdisk}")
    if source == rdisk:
        problems.append(f"{source} is the whole disk, not a partition")
    if fstype != exp.filesystem:
        problems.append(f"filesystem is {fstype}, configured {exp.filesystem}")
    if problems:
        return failed("; ".join(problems), *evidence)
    return passed(f"{source} ({fstype}) on the resource disk {rdisk} is mounted at {exp.mount_point}", *evidence)


@CHECKS.add(
    "resource-disk.readme",
    title="DATALOSS_WARNING_README.txt on the resource disk",
    verifies="waagent wrote DATALOSS_WARNING_README.txt to the mounted resource disk, so that users see the "
    "disk is temporary and its data can be lost.",
    source="waagent ResourceDiskHandler (DATALOSS_WARNING_FILE_NAME); LISA resource-disk tests (README)",
    agents=[Agent.WAAGENT],
)
def readme(ctx: CheckContext) -> CheckResult:
    exp, conf_ev = expected_resource_disk(ctx)
    if not exp.formatted:
        return skipped(f"resource disk handling is off ({exp.source})", *conf_ev)
    path = f"{exp.mount_point.rstrip('/')}/{README}"
    res = ctx.probe(readme_cmd(path))
    rdisk, rd_ev = resource_disk(ctx)
    evidence: list[Evidence] = [_note(ctx), res, rd_ev]
    if res.stdout.startswith(ABSENT):
        return failed(f"{path} is missing", *evidence)
    src = res.stdout.strip().splitlines()[-1].strip()
    if rdisk is None or disk_of(ctx, src) != rdisk:
        return failed(f"{path} exists but lives on {src}, not on the resource disk {rdisk}", *evidence)
    if "TEMPORARY DISK" not in res.stdout.upper():
        return failed(f"{path} does not carry the data-loss warning text", *evidence)
    return passed(f"{path} present on {src}", *evidence)


@CHECKS.add(
    "swap.resource-disk",
    title="Swap on the resource disk as configured",
    verifies="With swap enabled, an active swap of the configured size lives on the resource disk "
    "(waagent: <MountPoint>/swapfile of SwapSizeMB; cloud-init: the swap partition); with swap disabled, "
    "none is active there — the configuration is honoured either way.",
    source="waagent.conf ResourceDisk.EnableSwap/SwapSizeMB; create-upload-generic.md (resource-disk swap); "
    "LISA verify_swap",
)
def swap_on_resource_disk(ctx: CheckContext) -> CheckResult:
    exp, conf_ev = expected_resource_disk(ctx)
    rdisk, rd_ev = resource_disk(ctx)
    active, swaps_ev = swaps(ctx)
    devs, lsblk = topology(ctx)
    on_rdisk = []
    for s in active:
        dev = s.name if s.type == "partition" else (backing_device(ctx, s.name)[0] or "")
        if rdisk is not None and disk_of(ctx, dev) == rdisk:
            on_rdisk.append(s)
    evidence: list[Evidence] = [_note(ctx), *conf_ev, swaps_ev, rd_ev]
    if exp.swap == "none":
        if on_rdisk:
            return failed(f"swap is disabled ({exp.source}) but active on the resource disk: "
                          + ", ".join(s.name for s in on_rdisk), *evidence)
        return passed(f"swap disabled ({exp.source}) and none active on the resource disk", *evidence)
    if rdisk is None:
        return failed("swap is enabled but the resource disk is absent", *evidence)
    disk_mib = devs[rdisk].size // (1024 * 1024) if rdisk in devs else 0
    if exp.swap == "file":
        plan_file = f"{exp.mount_point.rstrip('/')}/swapfile"
        st = ctx.probe(swapfile_cmd(plan_file))
        logs = ctx.run(SWAP_LOG)
        evidence += [st, logs, lsblk]
        want = exp.swap_mib * 1024 * 1024
        problems = []
        if disk_mib and exp.swap_mib >= disk_mib:
            problems.append(f"SwapSizeMB={exp.swap_mib} does not fit on the resource disk ({disk_mib} MiB)")
        if exp.swap_mib <= 0:
            problems.append(f"EnableSwap=y but SwapSizeMB={exp.swap_mib}")
        entry = next((s for s in active if s.name == plan_file), None)
        if entry is None:
            problems.append(f"{plan_file} is not an active swap")
        elif entry not in on_rdisk:
            problems.append(f"{plan_file} is active but not on the resource disk")
        size_field = next((f for f in st.stdout.split("bytes")[0].split()[1:2]), "")
        if not size_field.isdigit():
            problems.append(f"{plan_file} does not exist")
        elif int(size_field) != want:
            problems.append(f"{plan_file} is {int(size_field)} bytes, SwapSizeMB={exp.swap_mib} means {want}")
        if problems:
            return failed("; ".join(problems), *evidence)
        return passed(f"{plan_file} of {exp.swap_mib} MiB is active on the resource disk {rdisk}", *evidence)
    parts = [s for s in on_rdisk if s.type == "partition"]
    evidence.append(lsblk)
    if not parts:
        return failed(f"no swap partition of the resource disk {rdisk} is active ({exp.source})", *evidence)
    return passed(f"swap partition {parts[0].name} ({parts[0].size_kib // 1024} MiB) active on the resource "
                  f"disk {rdisk}", *evidence)


@CHECKS.add(
    "swap.not-on-os-disk",
    title="No swap on the OS disk",
    verifies="No swap partition, active swap or fstab swap entry lives on the OS disk, because Azure OS "
    "disks are network storage and swap belongs on the local resource disk.",
    source="Azure certification test 'no swap partition on the OS disk'; LISA verify_no_swap_on_osdisk; "
    "create-upload-generic.md",
)
def not_on_os_disk(ctx: CheckContext) -> CheckResult:
    osd, os_ev = os_disk(ctx)
    active, swaps_ev = swaps(ctx)
    devs, _lsblk = topology(ctx)
    fstab_text, fstab = file_text(ctx, "/etc/fstab")
    plan = resource_plan(ctx)
    evidence = [swaps_ev, *os_ev, fstab]
    if osd is None:
        return failed("could not tell which disk holds the root filesystem", *evidence)
    problems = []
    for s in active:
        dev = s.name if s.type == "partition" else (backing_device(ctx, s.name)[0] or "")
        if s.type != "partition":
            evidence.append(backing_device(ctx, s.name)[1])
        if disk_of(ctx, dev) == osd:
            problems.append(f"active swap {s.name} ({s.type}) is on the OS disk {osd}")
    for d in devs.values():
        if d.disk == osd and d.fstype == "swap" and not any(d.name in p for p in problems):
            problems.append(f"partition {d.name} on the OS disk is formatted as swap")
    for line in (fstab_text or "").splitlines():
        f = line.split("#", 1)[0].split()
        if len(f) >= 3 and f[2] == "swap":
            if f[0].startswith((plan.device, *RESOURCE_DISK_NAMES)):
                continue
            problems.append(f"/etc/fstab activates swap from {f[0]}, which is not the resource disk")
    if problems:
        return failed("; ".join(problems), *evidence)
    return passed(f"no swap on the OS disk {osd} ({len(active)} active swap area(s) elsewhere)", *evidence)
