"""A test double for the guest: answers each command from a table of canned outputs.

It stands in for the SSH connection (:class:`imagekit.vm.guest.Guest`) in unit tests of the checks, so each
scenario can describe a guest that is wrong in one precise way. A command it has no answer for exits 127
and is recorded in ``unanswered``, so a test can prove that its scenario covers every command a check ran.
``healthy_waagent()`` and ``healthy_cloudinit()`` describe a correctly built, provisioned Debian 12 guest
with the outputs the real tools print there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from imagekit.checks import probes
from imagekit.checks.categories import family, provisioning, standard
from imagekit.checks.categories.provisioning import OVF_COPY
from imagekit.checks.categories.resource_disk import SWAP_LOG, readme_cmd, swapfile_cmd
from imagekit.checks.registry import ABSENT, PROBE_OK
from imagekit.config.profile import ProvisioningProfile
from imagekit.provision.resource_setup import RESOURCE_DISK, SHIM_MARK
from imagekit.vm.guest import CommandResult

Answer = str | tuple[int, str, str]  # stdout, or (returncode, stdout, stderr)


def ok(text: str = "") -> str:
    """The output of a shell probe that ran to its end: ``text`` and the closing marker line."""
    return text + PROBE_OK + "\n"


def absent(path: str) -> str:
    return f"{ABSENT} {path}\n"


@dataclass
class CannedGuest:
    answers: dict[str, Answer]
    calls: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        self.calls.append(command)
        if command not in self.answers:
            self.unanswered.append(command)
            return CommandResult(command, 127, "", "test double: no canned answer for this command")
        a = self.answers[command]
        if isinstance(a, str):
            return CommandResult(command, 0, a, "")
        return CommandResult(command, a[0], a[1], a[2])


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGVxYW1wbGVrZXlmb3J0ZXN0c29ubHkxMjM0NTY3ODkw imagekit-test"
PROFILE = ProvisioningProfile(hostname="ikvm", username="azureuser", ssh_public_keys=(KEY,))
GIB = 1024**3


def lsblk(root_fstype: str = "ext4", resource_children: list[dict[str, object]] | None = None,
          os_extra: list[dict[str, object]] | None = None, resource_size: int = GIB) -> str:
    def part(name: str, size: int, fstype: str | None, mp: str | None, parent: str) -> dict[str, object]:
        return {"name": name, "kname": name, "pkname": parent, "type": "part", "size": size, "fstype": fstype,
                "mountpoint": mp, "serial": None}

    rchildren = resource_children if resource_children is not None else [
        part("/dev/sdb1", resource_size - 1048576, "ext4", "/mnt/resource", "/dev/sdb")]
    return json.dumps({"blockdevices": [
        {"name": "/dev/sda", "kname": "/dev/sda", "pkname": None, "type": "disk", "size": 30 * GIB, "fstype": None,
         "mountpoint": None, "serial": "OSDISK",
         "children": [part("/dev/sda1", 30 * GIB - 1048576, root_fstype, "/", "/dev/sda"), *(os_extra or [])]},
        {"name": "/dev/sdb", "kname": "/dev/sdb", "pkname": None, "type": "disk", "size": resource_size,
         "fstype": None, "mountpoint": None, "serial": "RESOURCEDISK", "children": rchildren},
        {"name": "/dev/sr0", "kname": "/dev/sr0", "pkname": None, "type": "rom", "size": 374784,
         "fstype": "udf", "mountpoint": None, "serial": "QM00003"},
    ]}, indent=2)


def part(name: str, size: int, fstype: str | None, mp: str | None, parent: str = "/dev/sdb") -> dict[str, object]:
    return {"name": name, "kname": name, "pkname": parent, "type": "part", "size": size, "fstype": fstype,
            "mountpoint": mp, "serial": None}


WAAGENT_CONF = """\
# imagekit: from the distro table
Provisioning.Agent=waagent
Provisioning.RegenerateSshHostKeyPair=y
Provisioning.DeleteRootPassword=y
ResourceDisk.Format=y
ResourceDisk.Filesystem=ext4
ResourceDisk.MountPoint=/mnt/resource
ResourceDisk.EnableSwap=y
ResourceDisk.SwapSizeMB=256
AutoUpdate.Enabled=y
"""

SWAPS_HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
SWAPFILE = "/mnt/resource/swapfile"
SWAP_STAT = swapfile_cmd(SWAPFILE)
WAAGENT_LOG_GREP = standard.WAAGENT_LOG
CLOUD_INIT_LOG_GREP = standard.CLOUD_INIT_LOG
README_CMD = readme_cmd("/mnt/resource/DATALOSS_WARNING_README.txt")
SERIAL_CMD = standard.SERIAL
READLINK = probes.readlink_cmd(RESOURCE_DISK)
USER_KEYS = probes.read_file("/home/azureuser/.ssh/authorized_keys")
OVF_CAT = probes.read_file(OVF_COPY)


def mounts(*rows: str) -> str:
    """findmnt -rn -o TARGET,SOURCE,FSTYPE,OPTIONS: the root, the pseudo file systems, then ``rows``."""
    return "\n".join(["/ /dev/sda1 ext4 rw,relatime,errors=remount-ro", "/proc proc proc rw,nosuid",
                      "/sys sysfs sysfs rw,nosuid", "/run tmpfs tmpfs rw,nosuid,size=98312k", *rows]) + "\n"
AGENT_SHOW = "systemctl show -p Id -p LoadState -p ActiveState -p SubState walinuxagent.service waagent.service"
OVF_XML = """<?xml version="1.0" encoding="utf-8"?>
<ns0:Environment xmlns:ns0="http://schemas.dmtf.org/ovf/environment/1" xmlns:ns1="http://schemas.microsoft.com/windowsazure">
 <ns1:ProvisioningSection><ns1:Version>1.0</ns1:Version>
  <ns1:LinuxProvisioningConfigurationSet>
   <ns1:ConfigurationSetType>LinuxProvisioningConfiguration</ns1:ConfigurationSetType>
   <ns1:HostName>ikvm</ns1:HostName><ns1:UserName>azureuser</ns1:UserName>
   <ns1:DisableSshPasswordAuthentication>true</ns1:DisableSshPasswordAuthentication>
  </ns1:LinuxProvisioningConfigurationSet>
 </ns1:ProvisioningSection>
</ns0:Environment>
"""
CMDLINE = ("BOOT_IMAGE=/boot/vmlinuz-6.1.0-28-cloud-amd64 root=UUID=0a1b2c3d ro console=tty1 "
           "console=ttyS0,115200n8 earlyprintk=ttyS0 net.ifnames=0\n")
SSHD_T = "port 22\npermitrootlogin no\npasswordauthentication no\nclientaliveinterval 180\nclientalivecountmax 3\n"
SFDISK = json.dumps({"partitiontable": {"label": "dos", "id": "0x1d2e3f40", "device": "/dev/sda", "unit": "sectors",
                                        "sectorsize": 512, "partitions": [
                                            {"node": "/dev/sda1", "start": 2048, "size": 62912479, "type": "83",
                                             "bootable": True}]}})


def healthy_waagent() -> dict[str, Answer]:
    """A Debian 12 guest provisioned by waagent, resource disk formatted, 256 MiB swap file active."""
    return {
        probes.WAAGENT_CONF: ok(WAAGENT_CONF),
        probes.LSBLK: lsblk(),
        probes.ROOT_SOURCE: "/dev/sda1 ext4\n",
        probes.PROC_SWAPS: SWAPS_HEADER + f"{SWAPFILE}                  file\t\t262140\t\t0\t\t-2\n",
        probes.FSTAB: ok("UUID=0a1b2c3d / ext4 errors=remount-ro 0 1\n"),
        probes.SSHD_T: SSHD_T,
        probes.CMDLINE: CMDLINE,
        probes.WAAGENT_VERSION: "WALinuxAgent - 2.7.3.0 running on debian 12\nPython: 3.11.2\n"
                                "Goal state agent: 2.7.3.0\n",
        READLINK: "/dev/sdb\n",
        probes.MOUNTS: mounts("/mnt/resource /dev/sdb1 ext4 rw,relatime"),
        f"findmnt -n -o SOURCE --target {SWAPFILE}": "/dev/sdb1\n",
        SWAP_STAT: f"{SWAPFILE} 268435456 bytes mode 600\n/dev/sdb1\n",
        SWAP_LOG:
            "2026-11-22T01:00:01Z INFO Daemon Enable swap\n2026-11-22T01:00:01Z INFO Daemon Create swap file\n"
            "2026-11-22T01:00:09Z INFO Daemon Enabled 262144KB of swap at /mnt/resource/swapfile\n",
        README_CMD: "-rw-r--r-- 1 root root 399 Nov 22 01:00 /mnt/resource/DATALOSS_WARNING_README.txt\n"
                    "WARNING: THIS IS A TEMPORARY DISK.\n\nAny data stored on this drive is SUBJECT TO LOSS\n"
                    "/dev/sdb1\n",
        "getent passwd azureuser": "azureuser:x:1000:1000::/home/azureuser:/bin/bash\n",
        USER_KEYS: ok(KEY + "\n"),
        "hostname": "ikvm\n",
        "getent hosts ikvm || getent ahosts ikvm": "10.0.0.4        ikvm.internal.example ikvm\n",
        "sudo -l -U azureuser": "User azureuser may run the following commands on ikvm:\n    (ALL) NOPASSWD: ALL\n",
        provisioning.MARKER_CMD:
            f"-rw-r--r-- 1 root root 36 Nov 22 01:00 {provisioning.PROVISIONED_MARKER}\n"
            "c0ffee00-1234-5678-9abc-def012345678\n",
        OVF_CAT: ok(OVF_XML),
        AGENT_SHOW: "Id=walinuxagent.service\nLoadState=loaded\nActiveState=active\nSubState=running\n\n"
                    "Id=waagent.service\nLoadState=not-found\nActiveState=inactive\nSubState=dead\n",
        standard.HISTORY: ok(),
        standard.ACCOUNTS: ok("user azureuser uid=1000 home=/home/azureuser\n"
                              "keys azureuser /home/azureuser/.ssh/authorized_keys 1\n"),
        standard.ARCH: "x86_64\n64\n",
        standard.OPENSSL: "OpenSSL 3.0.15 3 Sep 2024 (Library: OpenSSL 3.0.15 3 Sep 2024)\n",
        standard.PYTHON: "Python 3.11.2\n",
        "sfdisk -J /dev/sda": SFDISK,
        standard.MODULES: ok("udf exit=0 insmod /lib/modules/6.1.0-28-cloud-amd64/kernel/fs/udf/udf.ko \n"
                             "vfat exit=0 (loaded or built in)\n"),
        standard.INITRAMFS_HV: ok("initramfs: /boot/initrd.img-6.1.0-28-cloud-amd64\nhv_netvsc.ko\nhv_storvsc.ko\n"
                                  "hv_vmbus.ko\n"),
        WAAGENT_LOG_GREP: ok("12:2026-11-22T01:00:00Z ERROR Daemon Daemon Failed to mount resource disk "
                             "[ResourceDiskError] unable to detect disk topology\n"
                             f"40:2026-11-22T01:00:30Z INFO Daemon {SHIM_MARK}: device_for_ide_port(1) -> sdb\n"
                             "-rw-r--r-- 1 root root 20480 Nov 22 01:01 /var/log/waagent.log\n"),
        SERIAL_CMD: "active\nenabled\n",
        standard.SERVICES: "ssh.service enabled\nsshd.service alias\nwalinuxagent.service enabled\n"
                           "waagent.service not-found\ncloud-init-local.service not-found\n"
                           "cloud-init.service not-found\ncloud-init-network.service not-found\n",
        # What Debian 12's hyperv-daemons package installs: a unit bound to the VMBus KVP device, started by
        # its udev rule (no VMBus under QEMU, so the device is absent).
        family.KVP_PROBE: ok(KVP_HEALTHY),
        family.NET_RULES_PROBE: ok(),
        family.SUDOERS_PROBE: ok("sudoers present\n"),
        family.REPOS_PROBE: ok(REPOS_HEALTHY),
    }


KVP_HEALTHY = (
    "unit hv-kvp-daemon.service file /lib/systemd/system/hv-kvp-daemon.service\n"
    "unit hv-kvp-daemon.service is-enabled disabled\n"
    "unit hv-kvp-daemon.service line BindsTo=sys-devices-virtual-misc-vmbus\\x21hv_kvp.device\n"
    "unit hv-kvp-daemon.service line ExecStart=/usr/sbin/hv_kvp_daemon -n\n"
    "unit hv-kvp-daemon.service exec-ok /usr/sbin/hv_kvp_daemon\n"
    'rule /lib/udev/rules.d/60-hyperv-daemons.rules:KERNEL=="vmbus/hv_kvp", TAG+="systemd", '
    'ENV{SYSTEMD_WANTS}+="hv-kvp-daemon.service"\n'
    "device absent\n"
)
REPOS_HEALTHY = (
    "== /etc/os-release\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nID=debian\n"
    "== /etc/apt/sources.list\n"
    "deb http://mirror.example/debian bookworm main\n"
    "deb http://mirror.example/debian bookworm-updates main\n"
    "deb http://mirror.example/debian-security bookworm-security main\n"
)


def healthy_cloudinit(swap: bool = True) -> dict[str, Answer]:
    """A Debian 12 guest provisioned by cloud-init; resource disk at /mnt with a 33 % swap partition."""
    a = healthy_waagent()
    a[probes.WAAGENT_CONF] = ok("Provisioning.Agent=cloud-init\nResourceDisk.Format=n\nResourceDisk.EnableSwap=n\n"
                                 "AutoUpdate.Enabled=y\n")
    if swap:
        a[probes.LSBLK] = lsblk(resource_children=[part("/dev/sdb1", 703594496, "ext4", "/mnt"),
                                                   part("/dev/sdb2", 368050176, "swap", "[SWAP]")])
        a[probes.PROC_SWAPS] = SWAPS_HEADER + "/dev/sdb2                               partition\t359424\t\t0\t\t-2\n"
        a[probes.FSTAB] = ok("UUID=0a1b2c3d / ext4 errors=remount-ro 0 1\n"
                             f"{RESOURCE_DISK}-part1\t/mnt\tauto\tdefaults,nofail,comment=cloudconfig\t0\t2\n"
                             f"{RESOURCE_DISK}-part2\tnone\tswap\tsw,nofail,comment=cloudconfig\t0\t0\n")
    else:
        a[probes.LSBLK] = lsblk(resource_children=[part("/dev/sdb1", GIB - 2 * 1048576, "ext4", "/mnt")])
        a[probes.PROC_SWAPS] = SWAPS_HEADER
    a[probes.MOUNTS] = mounts("/mnt /dev/sdb1 ext4 rw,relatime")
    a[provisioning.CLOUD_INIT_STATUS] = (
        "status: done\nboot_status_code: enabled-by-generator\nlast_update: Sun, 22 Nov 2026 01:00:20 +0000\n"
        "detail:\nDataSourceAzure [seed=/dev/sr0]\n"
        "-rw-r--r-- 1 root root 70 Nov 22 01:00 /var/lib/cloud/instance/boot-finished\n")
    a["cloud-init --version"] = "/usr/bin/cloud-init 22.4.2\n"
    a[WAAGENT_LOG_GREP] = ok("-rw-r--r-- 1 root root 8192 Nov 22 01:01 /var/log/waagent.log\n")
    a[CLOUD_INIT_LOG_GREP] = ok("-rw-r--r-- 1 root root 180000 Nov 22 01:01 /var/log/cloud-init.log\n")
    a[standard.SERVICES] = ("ssh.service enabled\nsshd.service alias\nwalinuxagent.service enabled\n"
                            "waagent.service not-found\ncloud-init-local.service enabled\ncloud-init.service enabled\n"
                            "cloud-init-network.service not-found\n")
    # cloud-init's disable_root: root gets the user's keys behind a command that refuses the login.
    a[standard.ACCOUNTS] = ok("user azureuser uid=1000 home=/home/azureuser\n"
                               "keys root /root/.ssh/authorized_keys 1\n"
                               "keys azureuser /home/azureuser/.ssh/authorized_keys 1\n")
    a["cat -- /root/.ssh/authorized_keys"] = (
        'no-port-forwarding,no-agent-forwarding,no-X11-forwarding,command="echo \'Please login as the user '
        '\\"azureuser\\" rather than the user \\"root\\".\';echo;sleep 10;exit 142" ' + KEY + "\n")
    return a


def with_changes(base: Mapping[str, Answer], **changes: Answer) -> dict[str, Answer]:
    out = dict(base)
    out.update(changes)
    return out
