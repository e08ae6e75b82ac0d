"""Making each agent's own resource-disk code run under QEMU, and undoing the test set-up afterwards.

On Azure both agents find the resource disk through Hyper-V VMBus sysfs, which QEMU cannot present
(../shared/research/azure-platform.md §5). The runner attaches the resource disk as a SCSI disk with the
serial ``RESOURCEDISK`` (so the guest sees :data:`RESOURCE_DISK`), formatted as Azure delivers it: MBR with
one NTFS partition holding DATALOSS_WARNING_README.txt. Then, per agent:

* **cloud-init** — through the platform's own channel: the OVF's CustomData carries a cloud-config
  (:func:`resource_disk_custom_data`) with ``device_aliases`` naming that disk ``ephemeral0`` and the
  ``disk_setup``/``fs_setup``/``mounts`` that cloud-init's Azure datasource would merge in on Azure.
  cloud-init partitions, formats, mounts and (if asked) makes a swap partition with its own code. It
  records the mounts in /etc/fstab (``comment=cloudconfig``), which :func:`undo_test_setup` removes.
  Not exercised: the Azure datasource's own detection of the disk (/dev/disk/cloud/azure_resource) and its
  "reformat only an NTFS disk holding nothing but the readme" rule (``overwrite`` is given explicitly).
* **waagent** — a test-only shim that lives only in /run (:func:`install_waagent_shim`): a
  ``sitecustomize.py`` that makes ``DefaultOSUtil.device_for_ide_port(1)`` — the VMBus lookup — return
  the attached disk, and a ``walinuxagent.service`` drop-in in /run/systemd/system that puts it on
  ``PYTHONPATH``; then the agent is restarted, and its daemon runs ResourceDisk handling unmodified:
  partition type change, mkfs, mount, DATALOSS_WARNING_README.txt, swap file. Not exercised: the VMBus
  lookup itself (bypassed; the shim logs a line saying so into waagent.log). Gone at the next reboot.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import shlex
import time
from dataclasses import dataclass
from typing import Any

from imagekit.config.distros import Agent, Distro
from imagekit.core.errors import BuildError, InputError, VMError
from imagekit.vm.guest import CommandResult, Guest

log = logging.getLogger(__name__)

RESOURCE_DISK_SERIAL = "RESOURCEDISK"
RESOURCE_DISK = f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{RESOURCE_DISK_SERIAL}"
SHIM_DIR = "/run/imagekit/waagent-shim"
SHIM_MARK = "imagekit test shim"
DROPIN_NAME = "imagekit-resource-disk-shim.conf"
# Debian and Ubuntu name the unit walinuxagent.service, the upstream/RPM packages waagent.service.
WAAGENT_UNITS = ("walinuxagent.service", "waagent.service")
CLOUD_INIT_DEFAULT_MOUNT = "/mnt"  # where cloud-init's Azure datasource mounts ephemeral0 on Azure

VMBUS_NOTE = (
    "waagent's Hyper-V VMBus disk lookup (DefaultOSUtil.device_for_ide_port) was bypassed by the "
    "imagekit test shim under /run; everything after the lookup ran as the agent ships it"
)
CLOUD_INIT_NOTE = (
    "cloud-init's own disk_setup/fs_setup/mounts ran against the disk named by CustomData "
    "device_aliases; the Azure datasource's detection of /dev/disk/cloud/azure_resource and its "
    "NTFS-reformat rule were not exercised (QEMU presents no VMBus device)"
)


@dataclass(frozen=True)
class ResourceDiskPlan:
    """What the resource disk should look like after the agent handled it (what the checks expect)."""

    owner: Agent
    device: str  # the attached disk, as the guest names it
    formatted: bool  # does the agent format and mount it at all
    mount_point: str
    filesystem: str
    swap: str  # "none", "file" (waagent's <mount>/swapfile) or "partition" (cloud-init's ephemeral0.2)
    swap_mib: int = 0  # waagent: SwapSizeMB
    swap_percent: int = 0  # cloud-init: the swap partition's share of the disk
    note: str = ""  # what is and is not exercised

    @property
    def swap_file(self) -> str:
        return f"{self.mount_point.rstrip('/')}/swapfile"

    def as_dict(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, Agent) else v) for k, v in self.__dict__.items()}


def plan_for(distro: Distro, *, swap_percent: int | None = None, device: str = RESOURCE_DISK) -> ResourceDiskPlan:
    """The plan for ``distro``: waagent's from its waagent.conf keys; cloud-init's from Azure's defaults
    (ext4 at /mnt), with a swap partition of ``swap_percent`` % of the disk when given."""
    if distro.agent is Agent.WAAGENT:
        if swap_percent is not None:
            raise InputError(
                f"swap_percent is for cloud-init images; {distro.id} uses waagent, whose swap comes from "
                "waagent.conf ResourceDisk.EnableSwap/SwapSizeMB"
            )
        swap = distro.resource_disk_format and distro.swap_enabled
        return ResourceDiskPlan(
            owner=Agent.WAAGENT, device=device, formatted=distro.resource_disk_format,
            mount_point=distro.resource_mount_point, filesystem=distro.resource_filesystem,
            swap="file" if swap else "none", swap_mib=distro.swap_size_mib if swap else 0, note=VMBUS_NOTE,
        )
    pct = swap_percent or 0
    if not 0 <= pct <= 90:
        raise InputError(f"swap_percent {pct} is out of range; allowed: 0 (no swap) to 90")
    return ResourceDiskPlan(
        owner=Agent.CLOUD_INIT, device=device, formatted=True, mount_point=CLOUD_INIT_DEFAULT_MOUNT,
        filesystem="ext4", swap="partition" if pct else "none", swap_percent=pct, note=CLOUD_INIT_NOTE,
    )


def cloud_config(plan: ResourceDiskPlan) -> dict[str, Any]:
    """The cloud-config that makes cloud-init handle the attached disk as its Azure datasource would."""
    if plan.owner is not Agent.CLOUD_INIT:
        raise InputError("a resource-disk cloud-config is only for cloud-init images")
    mount_opts = "defaults,nofail,x-systemd.after=cloud-init.service,_netdev"
    if plan.swap == "partition":
        # The layout of Azure's documented cloud-init swap recipe (create-upload-generic.md): MBR.
        disk = {"table_type": "mbr", "layout": [[100 - plan.swap_percent, 83], [plan.swap_percent, 82]],
                "overwrite": True}
        fs = [{"device": "ephemeral0.1", "filesystem": plan.filesystem, "replace_fs": "ntfs"},
              {"device": "ephemeral0.2", "filesystem": "swap"}]
        mounts = [["ephemeral0.1", plan.mount_point, "auto", mount_opts, "0", "2"],
                  ["ephemeral0.2", "none", "swap", "sw,nofail", "0", "0"]]
    else:
        # What DataSourceAzure merges in on Azure (BUILTIN_CLOUD_EPHEMERAL_DISK_CONFIG): GPT, one partition.
        disk = {"table_type": "gpt", "layout": [100], "overwrite": True}
        fs = [{"device": "ephemeral0.1", "filesystem": plan.filesystem, "replace_fs": "ntfs"}]
        mounts = [["ephemeral0.1", plan.mount_point, "auto", mount_opts, "0", "2"]]
    return {
        "device_aliases": {"ephemeral0": plan.device},
        "disk_setup": {"ephemeral0": disk},
        "fs_setup": fs,
        "mounts": mounts,
    }


def resource_disk_custom_data(distro: Distro, *, swap_percent: int | None = None) -> bytes | None:
    """CustomData for the OVF: a cloud-config for cloud-init images, ``None`` for waagent images (which
    get the /run shim instead and must not carry CustomData they would store in /var/lib/waagent)."""
    if distro.agent is not Agent.CLOUD_INIT:
        return None
    plan = plan_for(distro, swap_percent=swap_percent)
    # JSON is YAML; cloud-init's header line makes it a cloud-config.
    body = json.dumps(cloud_config(plan), indent=1, sort_keys=True)
    return b"#cloud-config\n" + body.encode() + b"\n"


# --- waagent: the /run shim -------------------------------------------------------------------------

_SHIM_TEMPLATE = '''\
# {mark}: test-only, lives in /run and is gone at reboot. Under QEMU there is no Hyper-V VMBus, so the
# agent's resource-disk lookup finds nothing; this makes DefaultOSUtil.device_for_ide_port(1) answer with
# the disk attached as the resource disk. The agent's ResourceDisk code then runs unmodified.
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_DISK = {disk!r}
_TARGET = "azurelinuxagent.common.osutil.default"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _patch(module):
    cls = module.DefaultOSUtil
    original = cls.device_for_ide_port

    def device_for_ide_port(self, port_id):
        if port_id != 1:
            return original(self, port_id)
        name = os.path.basename(os.path.realpath(_DISK)) if os.path.exists(_DISK) else None
        try:
            from azurelinuxagent.common import logger
            logger.info("{mark}: device_for_ide_port(1) -> {{0}} (from {{1}}); Hyper-V VMBus lookup bypassed",
                        name, _DISK)
        except Exception:
            pass
        return name

    cls.device_for_ide_port = device_for_ide_port


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


try:
    sys.meta_path.insert(0, _Finder())
except Exception as exc:  # never break the agent
    sys.stderr.write("{mark}: not installed: %s\\n" % exc)

# The distro's own sitecustomize (Debian has one) would be shadowed by this file: run it too.
try:
    _spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [p for p in sys.path if p and
                                                                       os.path.abspath(p) != _HERE])
    if _spec is not None and _spec.loader is not None:
        _mod = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_mod)
except Exception:
    pass
'''


def shim_source(disk: str = RESOURCE_DISK) -> str:
    """The sitecustomize.py that redirects waagent's resource-disk lookup to ``disk``."""
    return _SHIM_TEMPLATE.format(mark=SHIM_MARK, disk=disk)


def dropin_source() -> str:
    return f"# {SHIM_MARK}: test-only runtime drop-in, gone at reboot\n[Service]\nEnvironment=PYTHONPATH={SHIM_DIR}\n"


def _write_file_cmd(path: str, text: str, mode: str = "0644") -> str:
    b64 = base64.b64encode(text.encode()).decode()
    tmp = f"{path}.tmp"
    return (f"mkdir -p {shlex.quote(path.rsplit('/', 1)[0])} && printf %s {b64} | base64 -d > {shlex.quote(tmp)}"
            f" && chmod {mode} {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} {shlex.quote(path)}")


def _must(guest: Guest, command: str, what: str, timeout: float = 120.0) -> CommandResult:
    res = guest.run(command, timeout=timeout)
    if not res.ok:
        raise VMError(f"resource-disk test set-up: {what} failed:\n{res.evidence(1500)}")
    return res


def waagent_unit(guest: Guest) -> str:
    """The agent's systemd unit name in this guest."""
    res = guest.run("systemctl list-unit-files --no-legend " + " ".join(WAAGENT_UNITS))
    for unit in WAAGENT_UNITS:
        if unit in res.stdout:
            return unit
    raise VMError(f"no waagent unit ({' or '.join(WAAGENT_UNITS)}) in the guest:\n{res.evidence(1500)}")


def install_waagent_shim(guest: Guest, plan: ResourceDiskPlan) -> dict[str, Any]:
    """Install the /run shim and restart the agent so its ResourceDisk handling runs against the disk.

    Returns facts for the checks (the unit, the disk's kernel name, the note on what was bypassed).
    Raises :class:`VMError` when a step did not do what it should (each step is verified).
    """
    disk = _must(guest, f"readlink -f {shlex.quote(plan.device)}", "resolving the resource disk").stdout.strip()
    if not disk.startswith("/dev/"):
        raise VMError(f"the resource disk {plan.device} does not exist in the guest (got {disk!r})")
    unit = waagent_unit(guest)
    dropin_dir = f"/run/systemd/system/{unit}.d"
    _must(guest, _write_file_cmd(f"{SHIM_DIR}/sitecustomize.py", shim_source(plan.device)), "writing the shim")
    _must(guest, _write_file_cmd(f"{dropin_dir}/{DROPIN_NAME}", dropin_source()), "writing the drop-in")
    _must(guest, "systemctl daemon-reload", "systemctl daemon-reload")
    # The shim logs one line per lookup; counting them tells this start's lines from an earlier one's.
    marks = guest.run(f"grep -c '{SHIM_MARK}' /var/log/waagent.log").stdout.strip()
    env = _must(guest, f"systemctl show -p Environment -p DropInPaths {unit}", "reading the unit")
    if SHIM_DIR not in env.stdout:
        raise VMError(f"the drop-in did not take effect on {unit}:\n{env.evidence(1500)}")
    _must(guest, f"systemctl restart {unit}", f"restarting {unit}", timeout=180)
    log.info("waagent shim installed; %s restarted to handle %s (%s)", unit, plan.device, disk)
    return {"waagent_unit": unit, "resource_disk_kernel_name": disk, "resource_disk_note": plan.note,
            "waagent_shim": f"{SHIM_DIR}/sitecustomize.py + {dropin_dir}/{DROPIN_NAME}",
            "shim_lookups_before": int(marks) if marks.isdigit() else 0}


def _settled(guest: Guest, plan: ResourceDiskPlan, lookups_before: int = 0) -> tuple[bool, str]:
    """Has the agent finished with the resource disk (done or failed)? Returns (done, evidence).

    For waagent, only a start after the shim went in counts: more shim lookups than ``lookups_before``.
    """
    mp = shlex.quote(plan.mount_point)
    if plan.owner is Agent.WAAGENT:
        count = guest.run(f"grep -c '{SHIM_MARK}' /var/log/waagent.log").stdout.strip()
        if not count.isdigit() or int(count) <= lookups_before:
            return False, f"waagent has not looked the resource disk up since the restart ({count or 0} lookups)"
        # Only the log since the agent last started with the shim: an earlier run's lines do not count.
        res = guest.run(
            f"awk -v m='{SHIM_MARK}' 'index($0, m) {{buf = \"\"}} {{buf = buf $0 \"\\n\"}} END {{printf \"%s\", buf}}' "
            f"/var/log/waagent.log | grep -E 'Resource disk|swap|Failed|{SHIM_MARK}'; mountpoint {mp}; cat /proc/swaps"
        )
        out = res.stdout
        if "Failed to mount resource disk" in out or "Failed to enable swap" in out:
            return True, res.evidence()
        mounted = f"{plan.mount_point} is a mountpoint" in out
        if plan.swap == "file":
            return mounted and (plan.swap_file in out or "Enabled" in out), res.evidence()
        return mounted, res.evidence()
    res = guest.run("cloud-init status --wait", timeout=900)
    return True, res.evidence()


def activate_resource_disk(guest: Guest, plan: ResourceDiskPlan, *, timeout: float = 300.0,
                           poll: float = 2.0) -> dict[str, Any]:
    """Run the set-up for ``plan.owner`` and wait until the agent has handled the disk (or given up).

    Waiting ends on the agent's own signals (waagent's log lines and the mount/swap state; cloud-init's
    ``status --wait``), never on a fixed sleep. A timeout is not raised: the checks then report the state.
    """
    facts: dict[str, Any] = {"resource_disk_plan": plan.as_dict(), "resource_disk_note": plan.note}
    if plan.owner is Agent.WAAGENT:
        if not plan.formatted:
            # ResourceDisk.Format=n: waagent leaves the disk alone, so there is nothing to run or wait for.
            facts["resource_disk_note"] = "waagent.conf ResourceDisk.Format=n: the agent does not handle the disk"
            return facts
        facts.update(install_waagent_shim(guest, plan))
    start = time.monotonic()
    evidence = ""
    while time.monotonic() - start < timeout:
        done, evidence = _settled(guest, plan, int(facts.get("shim_lookups_before", 0)))
        if done:
            break
        time.sleep(poll)
    else:
        facts["resource_disk_timeout"] = f"agent did not finish with the resource disk in {timeout:.0f} s"
    facts["resource_disk_settle_seconds"] = round(time.monotonic() - start, 1)
    facts["resource_disk_settle_evidence"] = evidence
    return facts


# --- undo -----------------------------------------------------------------------------------------


def fstab_cleanup_command(device: str, fstab: str = "/etc/fstab") -> str:
    """A shell command deleting every fstab line that names ``device`` (sed -i writes a temp file and
    renames it, so the file is never half-written)."""
    escaped = re.sub(r"([\\/.^$*\[\]])", r"\\\1", device)
    return f"sed -i '/{escaped}/d' {shlex.quote(fstab)}"


def undo_test_setup(guest: Guest, distro: Distro, plan: ResourceDiskPlan | None = None) -> list[str]:
    """Remove what the resource-disk test set-up changed in the guest outside /run, and verify it.

    Call before deprovisioning. Returns what was done. Removes: /etc/fstab lines naming the resource
    disk (cloud-init writes them, ``comment=cloudconfig``; they would survive ``cloud-init clean`` and
    ``waagent -deprovision``); unmounts the resource disk and turns its swap off; removes a mount point
    the set-up created for cloud-init (only if empty and not /mnt); and, for tidiness, the /run shim.
    The directory waagent creates at ResourceDisk.MountPoint is left: waagent makes it on Azure too.
    """
    plan = plan or plan_for(distro)
    done: list[str] = []
    dev = shlex.quote(plan.device)
    fstab = guest.run(f"grep -nF {dev} /etc/fstab")
    if fstab.stdout.strip():
        _must(guest, fstab_cleanup_command(plan.device), "removing the resource-disk lines from /etc/fstab")
        done.append(f"removed from /etc/fstab: {fstab.stdout.strip()}")
    # Swap and mounts on the resource disk go away at shutdown anyway; turning them off here lets the
    # mount point be removed and keeps deprovisioning from racing the agent's swap file.
    swaps = guest.run(f"disk=$(readlink -f {dev}); awk -v d=\"$disk\" 'NR>1 && index($1, d)==1 {{print $1}}' "
                      "/proc/swaps")
    for name in swaps.stdout.split():
        _must(guest, f"swapoff {shlex.quote(name)}", f"swapoff {name}")
        done.append(f"swapoff {name}")
    if plan.swap == "file":
        res = guest.run(f"grep -qF {shlex.quote(plan.swap_file)} /proc/swaps && swapoff {shlex.quote(plan.swap_file)}")
        if res.ok:
            done.append(f"swapoff {plan.swap_file}")
    mounts = guest.run(f"disk=$(readlink -f {dev}); findmnt -rn -o TARGET,SOURCE | awk -v d=\"$disk\" "
                       "'index($2, d)==1 {print $1}'")
    for target in mounts.stdout.split():
        # A lazy unmount if something still holds it: the mount must not outlive the undo either way.
        _must(guest, f"umount {shlex.quote(target)} || umount -l {shlex.quote(target)}", f"unmounting {target}")
        done.append(f"umount {target}")
    if plan.owner is Agent.CLOUD_INIT and plan.mount_point not in ("/mnt", "/"):
        res = guest.run(f"rmdir {shlex.quote(plan.mount_point)}")
        if res.ok:
            done.append(f"rmdir {plan.mount_point}")
    res = guest.run(f"rm -rf {SHIM_DIR} /run/systemd/system/*.d/{DROPIN_NAME} && systemctl daemon-reload")
    if res.ok:
        done.append(f"removed the /run shim ({SHIM_DIR}, {DROPIN_NAME})")
    left = guest.run(f"grep -nF {dev} /etc/fstab")
    if left.stdout.strip():
        raise BuildError(f"resource-disk lines are still in /etc/fstab after the undo:\n{left.evidence(1500)}")
    log.info("undid the resource-disk test set-up: %s", "; ".join(done) or "nothing to undo")
    return done
