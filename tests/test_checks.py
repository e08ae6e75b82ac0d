"""Every check passes on a correctly built guest and fails — with evidence that says why — on a guest that is
wrong in the way the check guards against. The guest is a test double (tests/guest_double.py) answering
each command with the output the real tools print; the VM tests (test_provision_vm.py) run the same checks
against real guests."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from imagekit.checks import (
    Check,
    CheckContext,
    HealthReport,
    RecordedFabric,
    Status,
    catalogue,
    overall_ok,
    plan_for,
    probes,
    run_checks,
)
from imagekit.checks.categories import family, standard
from imagekit.checks.categories.provisioning import CLOUD_INIT_STATUS, MARKER_CMD, OVF_COPY, PROVISIONED_MARKER
from imagekit.checks.categories.resource_disk import SWAP_LOG
from imagekit.config import distros
from imagekit.config.profile import ProvisioningProfile
from imagekit.provision.resource_setup import RESOURCE_DISK
from tests.guest_double import (
    AGENT_SHOW,
    CLOUD_INIT_LOG_GREP,
    CMDLINE,
    KEY,
    OVF_CAT,
    OVF_XML,
    PROFILE,
    READLINK,
    README_CMD,
    REPOS_HEALTHY,
    SERIAL_CMD,
    SFDISK,
    SSHD_T,
    SWAP_STAT,
    SWAPFILE,
    SWAPS_HEADER,
    USER_KEYS,
    WAAGENT_CONF,
    WAAGENT_LOG_GREP,
    Answer,
    CannedGuest,
    absent,
    healthy_cloudinit,
    healthy_waagent,
    lsblk,
    mounts,
    ok,
    part,
)

READY = RecordedFabric((HealthReport("NotReady", "Provisioning", "Starting", 12.0),
                        HealthReport("Ready", seconds=20.5)))
CLI_GREP = ("grep -rniE '^\\s*ClientAliveInterval' /etc/ssh/sshd_config /etc/ssh/sshd_config.d "
            "|| echo '(no ClientAliveInterval line in sshd_config)'")


def make_ctx(distro_id: str = "debian-12", answers: dict[str, Answer] | None = None, *,
             profile: ProvisioningProfile = PROFILE, fabric: RecordedFabric = READY,
             swap_percent: int | None = None) -> tuple[CheckContext, CannedGuest]:
    d = distros.get(distro_id)
    if answers is None:
        answers = healthy_waagent() if d.agent.value == "waagent" else healthy_cloudinit()
    if swap_percent is None and d.agent.value == "cloud-init":
        swap_percent = 33
    guest = CannedGuest(answers)
    plan = plan_for(d, swap_percent=swap_percent)
    return CheckContext(guest=guest, distro=d, profile=profile, fabric=fabric, plan=plan), guest


# --- a correctly built guest passes ------------------------------------------------------------------


@pytest.mark.parametrize("distro_id", ["debian-12", "debian-12-cloudinit"])
def test_healthy_guest_passes_every_applicable_check(distro_id: str) -> None:
    ctx, guest = make_ctx(distro_id)
    runs = run_checks(ctx)
    assert guest.unanswered == [], "the healthy scenario must answer every command the checks run"
    bad = [(r.check.id, r.result.summary, r.result.evidence[:300]) for r in runs if not r.result.ok]
    assert bad == []
    assert overall_ok(runs)
    skipped = {r.check.id for r in runs if r.result.status is Status.SKIP}
    # the RHEL- and SUSE-family network checks never apply to Debian
    family_only = {"standard.rhel-network", "standard.suse-dhcp-hostname"}
    assert skipped == family_only | (
        {"standard.cloud-init-log"} if distro_id == "debian-12" else {"resource-disk.readme"})


def test_swap_disabled_configuration_passes_and_says_so() -> None:
    answers = healthy_waagent()
    answers[probes.WAAGENT_CONF] = ok(WAAGENT_CONF.replace("EnableSwap=y", "EnableSwap=n").replace("=256", "=0"))
    answers[probes.PROC_SWAPS] = SWAPS_HEADER
    ctx, _guest = make_ctx("debian-13", answers)
    result = catalogue()["swap.resource-disk"].run(ctx)
    assert result.status is Status.PASS, result
    assert "swap disabled" in result.summary
    assert "ResourceDisk.EnableSwap=n" in result.evidence


def test_waagent_log_excuses_only_the_qemu_lookup_error_before_the_shim() -> None:
    ctx, _ = make_ctx()
    result = catalogue()["standard.waagent-log"].run(ctx)
    assert result.status is Status.PASS
    assert "1 line(s) excused" in result.summary and "VMBus" in result.summary


def test_resource_disk_evidence_says_what_was_bypassed() -> None:
    ctx, _ = make_ctx()
    for cid in ("resource-disk.mounted", "resource-disk.readme", "swap.resource-disk"):
        ev = catalogue()[cid].run(ctx).evidence
        assert "VMBus" in ev and "bypassed" in ev, cid
    ctx, _ = make_ctx("debian-12-cloudinit")
    ev = catalogue()["resource-disk.mounted"].run(ctx).evidence
    assert "device_aliases" in ev and "not exercised" in ev


# --- a wrong guest fails, with evidence -------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    check_id: str
    changes: dict[str, Answer] = field(default_factory=dict)
    summary_has: str = ""
    evidence_has: str = ""
    distro: str = "debian-12"
    profile: ProvisioningProfile = PROFILE
    fabric: RecordedFabric = READY
    removed: tuple[str, ...] = ()


BIG_SWAP_CONF = ok(WAAGENT_CONF.replace("SwapSizeMB=256", "SwapSizeMB=4096"))
PASSWORD = "S3cret-Passw0rd!"

SCENARIOS = [
    # resource disk
    Scenario("resource disk not mounted", "resource-disk.mounted",
             {probes.MOUNTS: mounts()},
             "nothing is mounted at /mnt/resource", "ResourceDisk.MountPoint=/mnt/resource"),
    Scenario("mount point on the OS disk", "resource-disk.mounted",
             {probes.MOUNTS: mounts("/mnt/resource /dev/sda1 ext4 rw")},
             "is on the OS disk /dev/sda", "/mnt/resource /dev/sda1 ext4"),
    Scenario("wrong filesystem", "resource-disk.mounted",
             {probes.MOUNTS: mounts("/mnt/resource /dev/sdb1 xfs rw")},
             "filesystem is xfs, configured ext4", "ResourceDisk.Filesystem=ext4"),
    Scenario("resource disk absent", "resource-disk.mounted", {READLINK: absent(RESOURCE_DISK)},
             "is not present", RESOURCE_DISK),
    Scenario("cloud-init did not mount the disk", "resource-disk.mounted",
             {probes.MOUNTS: mounts("/mnt/other /dev/sdb1 ext4 rw")},
             "nothing is mounted at /mnt", "CustomData", distro="debian-12-cloudinit"),
    Scenario("README missing", "resource-disk.readme",
             {README_CMD: absent("/mnt/resource/DATALOSS_WARNING_README.txt")},
             "DATALOSS_WARNING_README.txt is missing", "@@absent /mnt/resource/DATALOSS_WARNING_README.txt"),
    # swap
    Scenario("EnableSwap with a swap size larger than the disk", "swap.resource-disk",
             {probes.WAAGENT_CONF: BIG_SWAP_CONF, probes.PROC_SWAPS: SWAPS_HEADER,
              SWAP_STAT: f"{SWAPFILE} 1061158912 bytes mode 600\n/dev/sdb1\n",
              SWAP_LOG:
                  "2026-11-22T01:00:01Z INFO Daemon Create swap file\n"
                  "dd: error writing '/mnt/resource/swapfile': No space left on device\n"
                  "2026-11-22T01:00:20Z ERROR Daemon Failed to enable swap [ResourceDiskError] "
                  "/mnt/resource/swapfile\n"},
             "SwapSizeMB=4096 does not fit on the resource disk (1024 MiB)", "No space left on device"),
    Scenario("swap file not active", "swap.resource-disk", {probes.PROC_SWAPS: SWAPS_HEADER},
             "/mnt/resource/swapfile is not an active swap", "Enable swap"),
    Scenario("swap file of the wrong size", "swap.resource-disk",
             {SWAP_STAT: f"{SWAPFILE} 134217728 bytes mode 600\n/dev/sdb1\n"},
             "is 134217728 bytes, SwapSizeMB=256 means 268435456", "134217728"),
    Scenario("swap disabled but active on the resource disk", "swap.resource-disk",
             {probes.WAAGENT_CONF: ok(WAAGENT_CONF.replace("EnableSwap=y", "EnableSwap=n"))},
             "swap is disabled", "ResourceDisk.EnableSwap=n", distro="debian-13"),
    Scenario("cloud-init swap partition not active", "swap.resource-disk", {probes.PROC_SWAPS: SWAPS_HEADER},
             "no swap partition of the resource disk /dev/sdb is active", "swap partition",
             distro="debian-12-cloudinit"),
    Scenario("swap partition on the OS disk", "swap.not-on-os-disk",
             {probes.LSBLK: lsblk(os_extra=[part("/dev/sda2", 2 * 1024**3, "swap", "[SWAP]", "/dev/sda")]),
              probes.PROC_SWAPS: SWAPS_HEADER + "/dev/sda2 partition 2097148 0 -2\n"},
             "active swap /dev/sda2 (partition) is on the OS disk /dev/sda", "/dev/sda2 partition"),
    Scenario("swap file on the OS disk", "swap.not-on-os-disk",
             {probes.PROC_SWAPS: SWAPS_HEADER + "/swapfile file 1048572 0 -2\n",
              "findmnt -n -o SOURCE --target /swapfile": "/dev/sda1\n"},
             "active swap /swapfile (file) is on the OS disk /dev/sda", "/swapfile"),
    Scenario("inactive swap partition on the OS disk", "swap.not-on-os-disk",
             {probes.LSBLK: lsblk(os_extra=[part("/dev/sda2", 2 * 1024**3, "swap", None, "/dev/sda")])},
             "partition /dev/sda2 on the OS disk is formatted as swap", "/dev/sda2 part 2048 MiB swap"),
    Scenario("fstab swap entry on the OS disk", "swap.not-on-os-disk",
             {probes.FSTAB: ok("UUID=0a1b2c3d / ext4 errors=remount-ro 0 1\n/swap.img none swap sw 0 0\n")},
             "/etc/fstab activates swap from /swap.img", "/swap.img none swap"),
    # provisioning
    Scenario("OVF user missing", "provisioning.user", {"getent passwd azureuser": (2, "", "")},
             "user azureuser does not exist", "getent passwd azureuser"),
    Scenario("OVF key not installed", "provisioning.user",
             {USER_KEYS: ok("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCother old@key\n")},
             "1 of 1 OVF key(s) missing", "ssh-rsa AAAAB3"),
    Scenario("password login left on", "provisioning.password-auth",
             {probes.SSHD_T: SSHD_T.replace("passwordauthentication no", "passwordauthentication yes")},
             "PasswordAuthentication is yes; the OVF asks for no", "passwordauthentication yes"),
    Scenario("password login off although the OVF allows it", "provisioning.password-auth", {},
             "PasswordAuthentication is no; the OVF asks for yes", "passwordauthentication no",
             profile=replace(PROFILE, disable_password_auth=False, password=PASSWORD)),
    Scenario("hostname not set", "provisioning.hostname", {"hostname": "localhost\n"},
             "hostname is 'localhost', the OVF says 'ikvm'", "localhost"),
    Scenario("hostname does not resolve", "provisioning.hostname",
             {"getent hosts ikvm || getent ahosts ikvm": (2, "", "")}, "hostname ikvm does not resolve",
             "getent hosts ikvm"),
    Scenario("sudo asks for a password the user never got", "provisioning.sudo",
             {"sudo -l -U azureuser": "User azureuser may run the following commands on ikvm:\n    (ALL) ALL\n"},
             "the OVF gave no password", "(ALL) ALL"),
    Scenario("no sudo rule", "provisioning.sudo",
             {"sudo -l -U azureuser": "User azureuser is not allowed to run sudo on ikvm.\n"},
             "may not run ALL commands as root", "not allowed"),
    Scenario("provisioned marker missing", "provisioning.marker",
             {MARKER_CMD: absent(PROVISIONED_MARKER)},
             f"{PROVISIONED_MARKER} is missing", "@@absent"),
    Scenario("cloud-init not done", "provisioning.marker",
             {CLOUD_INIT_STATUS: "status: running\n@@absent /var/lib/cloud/instance/boot-finished\n"},
             "cloud-init status is not 'done'", "status: running", distro="debian-12-cloudinit"),
    Scenario("OVF copy keeps the password", "provisioning.ovf-redacted",
             {OVF_CAT: ok(OVF_XML.replace("<ns1:UserName>azureuser</ns1:UserName>",
                                          f"<ns1:UserName>azureuser</ns1:UserName><ns1:UserPassword>{PASSWORD}"
                                          "</ns1:UserPassword>"))},
             "contains the OVF password in clear text", "<ns1:UserPassword>«value not shown»</ns1:UserPassword>",
             profile=replace(PROFILE, password=PASSWORD, disable_password_auth=False)),
    Scenario("OVF copy missing", "provisioning.ovf-redacted", {OVF_CAT: ok(absent(OVF_COPY))},
             f"{OVF_COPY} is missing", "@@absent"),
    Scenario("never reported Ready", "provisioning.ready-reported", {},
             "never reported Ready; last: NotReady ProvisioningFailed", "ProvisioningFailed",
             fabric=RecordedFabric((HealthReport("NotReady", "ProvisioningFailed", "user creation failed", 30.0),))),
    Scenario("no health report at all", "provisioning.ready-reported", {}, "no health report reached", "(none)",
             fabric=RecordedFabric(())),
    Scenario("agent not running", "provisioning.agent-running",
             {AGENT_SHOW: "Id=walinuxagent.service\nLoadState=loaded\nActiveState=failed\nSubState=failed\n\n"
                          "Id=waagent.service\nLoadState=not-found\nActiveState=inactive\nSubState=dead\n"},
             "walinuxagent.service is failed/failed", "ActiveState=failed"),
    # image standard
    Scenario("console=ttyS0 missing", "standard.cmdline-console",
             {probes.CMDLINE: CMDLINE.replace(" console=ttyS0,115200n8", "")},
             "console=ttyS0 is missing", "console=tty1"),
    Scenario("console=ttyS0 not last", "standard.cmdline-console",
             {probes.CMDLINE: CMDLINE.replace("console=tty1 console=ttyS0,115200n8", "console=ttyS0 console=tty1")},
             "console=tty1 comes last", "console=ttyS0 console=tty1"),
    Scenario("earlyprintk missing", "standard.cmdline-earlyprintk",
             {probes.CMDLINE: CMDLINE.replace(" earlyprintk=ttyS0", "")}, "earlyprintk=ttyS0 is missing",
             "/proc/cmdline"),
    Scenario("rootdelay on initramfs-tools", "standard.cmdline-rootdelay",
             {probes.CMDLINE: CMDLINE.replace(" net.ifnames=0", " rootdelay=300 net.ifnames=0")},
             "rootdelay=300 on a debian image", "rootdelay=300"),
    Scenario("rootdelay missing on dracut", "standard.cmdline-rootdelay", {}, "rootdelay=300 is missing",
             "/proc/cmdline", distro="almalinux-9"),
    Scenario("ClientAliveInterval missing", "standard.client-alive-interval",
             {probes.SSHD_T: SSHD_T.replace("clientaliveinterval 180", "clientaliveinterval 0"),
              CLI_GREP: "(no ClientAliveInterval line in sshd_config)\n"},
             "ClientAliveInterval is 0 (0 means unset)", "no ClientAliveInterval line"),
    Scenario("ClientAliveInterval too long", "standard.client-alive-interval",
             {probes.SSHD_T: SSHD_T.replace("clientaliveinterval 180", "clientaliveinterval 300"),
              CLI_GREP: "/etc/ssh/sshd_config:120:ClientAliveInterval 300\n"},
             "ClientAliveInterval is 300", "ClientAliveInterval 300"),
    Scenario("shell history left", "standard.shell-history", {standard.HISTORY: ok("/root/.bash_history 532\n")},
             "/root/.bash_history", "532"),
    Scenario("a user left behind", "standard.no-preexisting-users",
             {standard.ACCOUNTS: ok("user builder uid=1001 home=/home/builder\n"
                                    "user azureuser uid=1000 home=/home/azureuser\n"
                                    "password builder\nkeys builder /home/builder/.ssh/authorized_keys 2\n"),
              "cat -- /home/builder/.ssh/authorized_keys": "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCbuilder builder@ci\n"
                                                        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIbuilder2 b@ci\n"},
             "user builder (uid=1001)", "keys builder"),
    Scenario("root keeps a password and keys", "standard.no-preexisting-users",
             {standard.ACCOUNTS: ok("password root\nkeys root /root/.ssh/authorized_keys 1\n"),
              "cat -- /root/.ssh/authorized_keys": "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCvendor vendor@build\n"},
             "root has a password", "keys root /root/.ssh/authorized_keys"),
    Scenario("root keeps the OVF key without the login refusal", "standard.no-preexisting-users",
             {"cat -- /root/.ssh/authorized_keys": KEY + "\n"}, "root has SSH keys in /root/.ssh/authorized_keys",
             "ssh-ed25519", distro="debian-12-cloudinit"),
    Scenario("agent too old", "standard.waagent-version",
             {probes.WAAGENT_VERSION: "WALinuxAgent - 2.2.40 running on debian 10\n"}, "older than 2.2.41", "2.2.40"),
    Scenario("auto-update off", "standard.agent-autoupdate",
             {probes.WAAGENT_CONF: ok(WAAGENT_CONF.replace("AutoUpdate.Enabled=y", "AutoUpdate.Enabled=n"))},
             "AutoUpdate.Enabled=n", "AutoUpdate.Enabled=n"),
    Scenario("32-bit", "standard.64bit", {standard.ARCH: "i686\n32\n"}, "not a 64-bit system", "i686"),
    Scenario("no openssl", "standard.openssl", {standard.OPENSSL: absent("openssl")},
             "OpenSSL is not installed", "@@absent openssl"),
    Scenario("no python", "standard.python", {standard.PYTHON: absent("python")},
             "Python is not installed", "@@absent python"),
    Scenario("root partition misaligned", "standard.root-partition",
             {"sfdisk -J /dev/sda": SFDISK.replace('"start": 2048', '"start": 63')},
             "first partition starts at byte 32256 (sector 63), not 1 MiB", '"start": 63'),
    Scenario("separate /var partition", "standard.root-partition",
             {"sfdisk -J /dev/sda": SFDISK.replace(
                 '"bootable": true}]', '"bootable": true}, {"node": "/dev/sda2", "start": 62914560, "size": 2048, '
                                       '"type": "83"}]'),
              probes.LSBLK: lsblk(os_extra=[part("/dev/sda2", 1048576, "ext4", "/var", "/dev/sda")])},
             "extra partition /dev/sda2 (type 83, mounted at /var)", "/dev/sda2"),
    Scenario("udf missing", "standard.udf-vfat",
             {standard.MODULES: ok("udf exit=1 modprobe: FATAL: Module udf not found in directory /lib/modules/6.1\n"
                                   "vfat exit=0 (loaded or built in)\n")}, "udf is not available", "FATAL"),
    Scenario("udf disabled by hardening", "standard.udf-vfat",
             {standard.MODULES: ok("udf exit=0 install /bin/true \nvfat exit=0 (loaded or built in)\n"
                                   "install udf /bin/true\n")}, "udf is disabled", "install /bin/true"),
    Scenario("hv_netvsc not in the initramfs", "standard.hv-initramfs",
             {standard.INITRAMFS_HV: ok("initramfs: /boot/initrd.img-6.1.0-28-cloud-amd64\nhv_storvsc.ko\n"
                                        "hv_vmbus.ko\n")},
             "missing from the initramfs: hv_netvsc", "initrd.img"),
    Scenario("agent error in waagent.log", "standard.waagent-log",
             {WAAGENT_LOG_GREP: ok("55:2026-11-22T01:02:00Z ERROR ExtHandler ExtHandler Event: name=WALinuxAgent, "
                                   "op=Download, message=Failed to download\n"
                                   "40:2026-11-22T01:00:30Z INFO Daemon imagekit test shim: device_for_ide_port(1)\n")},
             "1 error line(s) in waagent.log", "Failed to download"),
    Scenario("VMBus error without the shim is not excused", "standard.waagent-log",
             {WAAGENT_LOG_GREP: ok("12:2026-11-22T01:00:00Z ERROR Daemon Daemon Failed to mount resource disk "
                                   "[ResourceDiskError] unable to detect disk topology\n")},
             "1 error line(s)", "unable to detect disk topology"),
    Scenario("cloud-init module failed", "standard.cloud-init-log",
             {CLOUD_INIT_LOG_GREP: ok("812:2026-11-22 01:00:12,000 - util.py[WARNING]: Running module locale "
                                      "(<module 'cloudinit.config.cc_locale'>) failed\n")},
             "1 error/failure line(s) in cloud-init.log", "Running module locale", distro="debian-12-cloudinit"),
    Scenario("cloud-init disabled", "standard.services-enabled",
             {standard.SERVICES: "ssh.service enabled\nsshd.service alias\nwalinuxagent.service enabled\n"
                                 "waagent.service not-found\ncloud-init-local.service disabled\n"
                                 "cloud-init.service not-found\ncloud-init-network.service disabled\n"},
             "cloud-init is not enabled", "cloud-init-network.service disabled", distro="debian-12-cloudinit"),
    Scenario("an ERROR next to the excused DHCP artefact still fails", "standard.cloud-init-log",
             {CLOUD_INIT_LOG_GREP: ok("148:2026-11-22 01:46:52,925 - azure.py[ERROR]: Azure datasource failure "
                                      "occurred: result=error|reason=failure to find primary DHCP interface|\n"
                                      "300:2026-11-22 01:47:00,000 - cc_disk_setup.py[WARNING]: Failed partitioning "
                                      "operation\n")},
             "1 error/failure line(s) in cloud-init.log; 1 line(s) excused", "Failed partitioning",
             distro="debian-12-cloudinit"),
    Scenario("no serial getty", "standard.serial-console", {SERIAL_CMD: "inactive\ndisabled\n"},
             "no getty on ttyS0", "inactive"),
    Scenario("KVP daemon not installed", "standard.hv-kvp-daemon", {family.KVP_PROBE: ok("device absent\n")},
             "hyperv-daemons", "device absent"),
    Scenario("persistent net rules left", "standard.no-persistent-net-rules",
             {family.NET_RULES_PROBE: ok("present /etc/udev/rules.d/70-persistent-net.rules 212 bytes\n")},
             "70-persistent-net.rules", "212 bytes"),
    Scenario("sudo asks for the target's password", "standard.sudo-no-targetpw",
             {family.SUDOERS_PROBE: ok("/etc/sudoers:9:Defaults targetpw\nsudoers present\n")},
             "targetpw", "/etc/sudoers:9"),
    Scenario("apt sources of another release", "standard.repositories",
             {family.REPOS_PROBE: ok(REPOS_HEALTHY.replace(" bookworm", " bullseye"))},
             "bookworm", "bullseye-updates"),
    Scenario("RHEL: NETWORKING=no", "standard.rhel-network",
             {family.RHEL_NETWORK_PROBE: ok("== /etc/sysconfig/network\nNETWORKING=no\n"
                                            "== /etc/sysconfig/network-scripts/ifcfg-eth0\nDEVICE=eth0\n"
                                            "BOOTPROTO=dhcp\nONBOOT=yes\n== NetworkManager.service\nenabled\n")},
             "NETWORKING=yes", "NETWORKING=no", distro="rhel-9"),
    Scenario("SUSE: DHCP sets the host name", "standard.suse-dhcp-hostname",
             {family.SUSE_DHCP_PROBE: ok('12:DHCLIENT_SET_HOSTNAME="yes"\n')},
             'DHCLIENT_SET_HOSTNAME="yes"', "12:DHCLIENT", distro="sles-15"),
    Scenario("sshd disabled", "standard.services-enabled",
             {standard.SERVICES: "ssh.service disabled\nsshd.service not-found\nwalinuxagent.service enabled\n"
                                 "waagent.service not-found\ncloud-init-local.service not-found\n"
                                 "cloud-init.service not-found\ncloud-init-network.service not-found\n"},
             "sshd is not enabled", "ssh.service disabled"),
]


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_wrong_guest_fails_with_evidence(sc: Scenario) -> None:
    d = distros.get(sc.distro)
    base = healthy_waagent() if d.agent.value == "waagent" else healthy_cloudinit()
    base.update(sc.changes)
    ctx, guest = make_ctx(sc.distro, base, profile=sc.profile, fabric=sc.fabric)
    result = catalogue()[sc.check_id].run(ctx)
    assert result.status is Status.FAIL, (result.summary, result.evidence[:500], guest.unanswered)
    assert sc.summary_has in result.summary, result.summary
    assert sc.evidence_has in result.evidence, result.evidence
    assert PASSWORD not in result.evidence + result.summary, "a password reached the evidence"


def test_every_check_has_a_failing_scenario() -> None:
    covered = {s.check_id for s in SCENARIOS}
    assert set(catalogue()) - covered == set()


def test_the_scenarios_named_in_the_issue_exist() -> None:
    names = {s.name for s in SCENARIOS}
    for required in ("swap partition on the OS disk", "a user left behind", "ClientAliveInterval missing",
                     "EnableSwap with a swap size larger than the disk", "console=ttyS0 missing"):
        assert required in names


# --- the framework ------------------------------------------------------------------------------------


def test_a_crashing_check_is_an_error_and_the_others_still_run() -> None:
    def boom(ctx: CheckContext) -> object:
        raise RuntimeError("probe exploded")

    crash = Check(id="test.crash", title="crash", verifies="nothing", source="test", category="test",
                  fn=boom)  # type: ignore[arg-type]
    ctx, _ = make_ctx()
    runs = run_checks(ctx, [crash, catalogue()["standard.64bit"]])
    assert runs[0].result.status is Status.ERROR
    assert "RuntimeError: probe exploded" in runs[0].result.summary
    assert "Traceback" in runs[0].result.evidence
    assert runs[1].result.status is Status.PASS
    assert not overall_ok(runs)


def test_checks_outside_their_agent_or_family_are_skipped_with_the_reason() -> None:
    ctx, guest = make_ctx("debian-12")
    result = catalogue()["standard.cloud-init-log"].run(ctx)
    assert result.status is Status.SKIP and "cloud-init" in result.summary
    assert guest.calls == []


def test_commands_run_once_per_context() -> None:
    ctx, guest = make_ctx()
    run_checks(ctx)
    assert guest.calls.count(probes.SSHD_T) == 1
    assert guest.calls.count(probes.LSBLK) == 1


def test_every_check_is_declared_fully() -> None:
    for c in catalogue().values():
        assert c.id.startswith(c.category + ".")
        assert c.title and c.source and c.verifies.endswith(".")
        assert c.verifies.count(". ") == 0, f"{c.id}: 'verifies' should be one sentence"


def test_unknown_check_names_get_a_clear_error() -> None:
    from imagekit.checks import select
    from imagekit.core.errors import InputError

    with pytest.raises(InputError, match=r"unknown check id.*known: provisioning\.user"):
        select(["nope"])
    with pytest.raises(InputError, match="known: provisioning, resource-disk, standard, swap"):
        select(categories=["nope"])


def test_key_parsing_ignores_options_and_comments() -> None:
    from imagekit.checks.probes import key_id

    body = KEY.split()[1]
    assert key_id('from="10.0.0.0/8",no-pty ' + KEY) == ("ssh-ed25519", body)
    assert key_id(KEY.rsplit(" ", 1)[0]) == ("ssh-ed25519", body)


def test_cloud_init_24_unit_names_and_the_dhcp_artefact_pass_with_a_note() -> None:
    """Debian 13 (cloud-init 25.1): cloud-init-network.service replaces cloud-init.service; QEMU's DHCP
    without option 121/245 makes cloud-init log an ERROR that Azure's DHCP would not cause."""
    answers = healthy_cloudinit()
    answers[standard.SERVICES] = ("ssh.service enabled\nsshd.service alias\nwalinuxagent.service enabled\n"
                                  "waagent.service not-found\ncloud-init-local.service enabled\n"
                                  "cloud-init.service not-found\ncloud-init-network.service enabled\n")
    answers[CLOUD_INIT_LOG_GREP] = ok("148:2026-11-22 01:46:52,925 - azure.py[ERROR]: Azure datasource failure "
                                      "occurred: result=error|reason=failure to find primary DHCP interface|\n")
    ctx, _ = make_ctx("debian-13-cloudinit", answers)
    assert catalogue()["standard.services-enabled"].run(ctx).status is Status.PASS
    log = catalogue()["standard.cloud-init-log"].run(ctx)
    assert log.status is Status.PASS and "1 line(s) excused" in log.summary and "option 121/245" in log.summary


def test_the_closing_marker_may_follow_a_last_line_without_newline() -> None:
    """A probe that cats a file with no final newline (waagent's ovf-env.xml copy) prints the marker on the
    same line; that probe ran to its end. A marker missing altogether is still a failed probe."""
    from imagekit.checks.registry import PROBE_OK, ProbeFailed

    cmd = "cat -- /var/lib/waagent/ovf-env.xml && echo " + PROBE_OK
    ctx, _ = make_ctx(answers={cmd: "<Environment/>" + PROBE_OK + "\n"})
    assert ctx.probe(cmd, marker=True).stdout == "<Environment/>\n"
    ctx, _ = make_ctx(answers={cmd: "<Environment/>\n"})
    with pytest.raises(ProbeFailed, match="closing marker is missing"):
        ctx.probe(cmd, marker=True)
