"""The family checks (imagekit/checks/family.py) run their real probe scripts under /bin/sh against planted
fake roots: each passes on a root laid out as Azure's guides and LISA ask, fails on a root that is wrong
in the way it guards against, and is an error when its probe does not work.

The planted files are written here from their sources (the Debian hyperv-daemons 6.1 package's unit and
udev rule, Azure's preparation guides, LISA's AzureImageStandard), not from the product's tables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from imagekit.checks import CheckContext, Status, catalogue
from imagekit.checks.categories.family import ROOT_VAR
from imagekit.config import distros
from imagekit.config.profile import ProvisioningProfile
from imagekit.vm.guest import CommandResult

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGVxYW1wbGVrZXlmb3J0ZXN0c29ubHkxMjM0NTY3ODkw family-test"
PROFILE = ProvisioningProfile(hostname="ikvm", username="azureuser", ssh_public_keys=(KEY,))
FAMILY_CHECKS = ("standard.hv-kvp-daemon", "standard.no-persistent-net-rules", "standard.sudo-no-targetpw",
                 "standard.rhel-network", "standard.suse-dhcp-hostname", "standard.repositories")

# The Debian package's own files (hyperv-daemons 6.1.x, bookworm), as dpkg-deb -x unpacks them.
DEBIAN_KVP_UNIT = """[Unit]
Description=Hyper-V key-value pair (KVP) daemon
DefaultDependencies=no
Before=sysinit.target shutdown.target
Conflicts=hyperv-daemons.hv-kvp-daemon.service shutdown.target
BindsTo=sys-devices-virtual-misc-vmbus\\x21hv_kvp.device
IgnoreOnIsolate=1

[Service]
ExecStart=/usr/sbin/hv_kvp_daemon -n

[Install]
WantedBy=multi-user.target
"""
DEBIAN_KVP_RULES = (
    'KERNEL=="vmbus/hv_fcopy", TAG+="systemd", ENV{SYSTEMD_WANTS}+="hv-fcopy-daemon.service"\n'
    'KERNEL=="vmbus/hv_kvp", TAG+="systemd", ENV{SYSTEMD_WANTS}+="hv-kvp-daemon.service"\n'
)
# Fedora/RHEL-style packaging: the unit is enabled (preset) and conditioned on the device.
RHEL_KVP_UNIT = """[Unit]
Description=Hyper-V KVP daemon
ConditionPathExists=/dev/vmbus/hv_kvp

[Service]
ExecStart=/usr/sbin/hypervkvpd -n

[Install]
WantedBy=multi-user.target
"""

needs_systemctl = pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl not on this host")


class RootShell:
    """Runs each command for real with /bin/sh, with the probe root variable pointing at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.commands: list[str] = []

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        self.commands.append(command)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), ROOT_VAR: str(self.root)}
        p = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=timeout, env=env)
        return CommandResult(command, p.returncode, p.stdout, p.stderr)


class BrokenGuest:
    """A guest whose commands do not work in one way: an exit code, stdout and stderr, whatever was asked."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.answer = (returncode, stdout, stderr)

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        return CommandResult(command, *self.answer)


def put(root: Path, path: str, text: str = "", mode: int = 0o644) -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(mode)
    return p


def link(root: Path, path: str, target: str) -> None:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.symlink_to(target)


def run_check(check_id: str, root: Path, distro_id: str = "debian-12") -> tuple[Status, str, str]:
    ctx = CheckContext(guest=RootShell(root), distro=distros.get(distro_id), profile=PROFILE)
    r = catalogue()[check_id].run(ctx)
    return r.status, r.summary, r.evidence


def debian_kvp_root(root: Path, *, rules: bool = True, binary: bool = True) -> Path:
    put(root, "/etc/os-release", "ID=debian\n")
    put(root, "/lib/systemd/system/hv-kvp-daemon.service", DEBIAN_KVP_UNIT)
    if binary:
        put(root, "/usr/sbin/hv_kvp_daemon", "#!/bin/sh\n", 0o755)
    if rules:
        put(root, "/lib/udev/rules.d/60-hyperv-daemons.rules", DEBIAN_KVP_RULES)
    return root


# --- Hyper-V KVP daemon ----------------------------------------------------------------------------------


@needs_systemctl
def test_kvp_passes_on_debians_packaging_and_says_running_is_not_observable(tmp_path: Path) -> None:
    st, summary, ev = run_check("standard.hv-kvp-daemon", debian_kvp_root(tmp_path))
    assert st is Status.PASS, (summary, ev)
    assert "hv-kvp-daemon.service started by udev when /dev/vmbus/hv_kvp appears" in summary
    assert "bound to the VMBus device (BindsTo=sys-devices-virtual-misc-vmbus" in summary
    assert "cannot be observed here" in summary and "no VMBus under QEMU" in ev
    assert "is-enabled disabled" in ev  # Debian leaves it disabled; udev starts it


@needs_systemctl
def test_kvp_fails_when_the_package_is_missing(tmp_path: Path) -> None:
    put(tmp_path, "/etc/os-release", "ID=debian\n")
    st, summary, _ = run_check("standard.hv-kvp-daemon", tmp_path)
    assert st is Status.FAIL
    assert "no KVP daemon is installed" in summary and "hyperv-daemons" in summary


@needs_systemctl
def test_kvp_fails_when_masked(tmp_path: Path) -> None:
    root = debian_kvp_root(tmp_path)
    link(root, "/etc/systemd/system/hv-kvp-daemon.service", "/dev/null")
    st, summary, _ = run_check("standard.hv-kvp-daemon", root)
    assert st is Status.FAIL and "hv-kvp-daemon.service is masked" in summary


@needs_systemctl
def test_kvp_fails_when_disabled_and_nothing_starts_it(tmp_path: Path) -> None:
    st, summary, _ = run_check("standard.hv-kvp-daemon", debian_kvp_root(tmp_path, rules=False))
    assert st is Status.FAIL
    assert "is disabled and no udev rule starts it" in summary


@needs_systemctl
def test_kvp_fails_when_the_daemon_binary_is_gone(tmp_path: Path) -> None:
    st, summary, _ = run_check("standard.hv-kvp-daemon", debian_kvp_root(tmp_path, binary=False))
    assert st is Status.FAIL and "/usr/sbin/hv_kvp_daemon, which is not installed" in summary


@needs_systemctl
def test_kvp_enabled_unit_passes_and_a_present_device_demands_it_runs(tmp_path: Path) -> None:
    put(tmp_path, "/usr/lib/systemd/system/hypervkvpd.service", RHEL_KVP_UNIT)
    put(tmp_path, "/usr/sbin/hypervkvpd", "#!/bin/sh\n", 0o755)
    link(tmp_path, "/etc/systemd/system/multi-user.target.wants/hypervkvpd.service",
         "/usr/lib/systemd/system/hypervkvpd.service")
    st, summary, ev = run_check("standard.hv-kvp-daemon", tmp_path, "azurelinux-3")
    assert st is Status.PASS, (summary, ev)
    assert "hypervkvpd.service enabled; bound to the VMBus device (ConditionPathExists=/dev/vmbus/hv_kvp)" in summary
    # With the VMBus device there (as on Hyper-V) the daemon must be running; offline it cannot be.
    put(tmp_path, "/dev/vmbus/hv_kvp")
    st, summary, _ = run_check("standard.hv-kvp-daemon", tmp_path, "azurelinux-3")
    assert st is Status.FAIL and "/dev/vmbus/hv_kvp exists but hypervkvpd.service is" in summary


def test_kvp_does_not_apply_to_flatcar(tmp_path: Path) -> None:
    st, summary, _ = run_check("standard.hv-kvp-daemon", tmp_path, "flatcar")
    assert st is Status.SKIP and "flatcar" in summary


# --- persistent network rules ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/etc/udev/rules.d/70-persistent-net.rules",
                                  "/etc/udev/rules.d/85-persistent-net-cloud-init.rules",
                                  "/lib/udev/rules.d/75-persistent-net-generator.rules"])
def test_persistent_net_rules_fail(tmp_path: Path, path: str) -> None:
    put(tmp_path, path, 'SUBSYSTEM=="net", ATTR{address}=="00:15:5d:01:02:03", NAME="eth0"\n')
    st, summary, _ = run_check("standard.no-persistent-net-rules", tmp_path)
    assert st is Status.FAIL and path in summary


def test_a_rule_for_this_vms_own_nic_passes_and_one_for_another_mac_fails(tmp_path: Path) -> None:
    """cloud-init's ifupdown renderer writes 70-persistent-net.rules for the NIC it provisioned: that names
    the VM's own MAC (and is removed before capture). A rule for any other MAC came from another VM."""
    rules = "/etc/udev/rules.d/70-persistent-net.rules"
    put(tmp_path, "/sys/class/net/eth0/address", "52:54:00:ab:cd:ef\n")
    put(tmp_path, rules, 'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", ATTR{address}=="52:54:00:AB:CD:EF", '
        'NAME="eth0"\n')
    st, summary, _ = run_check("standard.no-persistent-net-rules", tmp_path)
    assert st is Status.PASS and "own NIC" in summary and "52:54:00:ab:cd:ef" in summary, summary
    put(tmp_path, rules, 'SUBSYSTEM=="net", ACTION=="add", ATTR{address}=="00:0d:3a:11:22:33", NAME="eth0"\n')
    st, summary, _ = run_check("standard.no-persistent-net-rules", tmp_path)
    assert st is Status.FAIL and rules in summary, summary


def test_no_persistent_net_rules_pass(tmp_path: Path) -> None:
    put(tmp_path, "/etc/udev/rules.d/60-other.rules", "# unrelated\n")
    st, summary, _ = run_check("standard.no-persistent-net-rules", tmp_path)
    assert st is Status.PASS, summary


# --- sudo targetpw ---------------------------------------------------------------------------------------------


def test_targetpw_fails_in_sudoers_and_in_a_drop_in(tmp_path: Path) -> None:
    put(tmp_path, "/etc/sudoers", "Defaults env_reset\nDefaults targetpw   # ask for root's password\n")
    st, summary, _ = run_check("standard.sudo-no-targetpw", tmp_path, "sles-15")
    assert st is Status.FAIL and "/etc/sudoers:2:Defaults targetpw" in summary
    put(tmp_path, "/etc/sudoers", "Defaults env_reset\n# Defaults targetpw\n")
    put(tmp_path, "/etc/sudoers.d/50-x", "Defaults    targetpw\n")
    st, summary, _ = run_check("standard.sudo-no-targetpw", tmp_path, "sles-15")
    assert st is Status.FAIL and "/etc/sudoers.d/50-x:1:" in summary


def test_commented_or_negated_targetpw_passes(tmp_path: Path) -> None:
    put(tmp_path, "/etc/sudoers", "# Defaults targetpw\nDefaults !targetpw\n%sudo ALL=(ALL:ALL) ALL\n")
    st, summary, _ = run_check("standard.sudo-no-targetpw", tmp_path)
    assert st is Status.PASS, summary


def test_missing_sudoers_sets_no_targetpw_and_says_so(tmp_path: Path) -> None:
    # LISA reads /etc/sudoers and finds no targetpw line when there is none; sudo itself is checked elsewhere.
    (tmp_path / "etc").mkdir()
    put(tmp_path, "/etc/sudoers.d/50-x", "Defaults targetpw\n")
    st, summary, _ = run_check("standard.sudo-no-targetpw", tmp_path)
    assert st is Status.FAIL and "/etc/sudoers.d/50-x:1:" in summary
    (tmp_path / "etc/sudoers.d/50-x").unlink()
    st, summary, _ = run_check("standard.sudo-no-targetpw", tmp_path)
    assert st is Status.PASS and "there is no /etc/sudoers" in summary


# --- RHEL family network ------------------------------------------------------------------------------------------

# redhat-create-upload-vhd, RHEL 7 section: the files as the guide writes them.
SYSCONFIG_NETWORK = "NETWORKING=yes\nHOSTNAME=localhost.localdomain\n"
IFCFG_ETH0 = ("DEVICE=eth0\nONBOOT=yes\nBOOTPROTO=dhcp\nTYPE=Ethernet\nUSERCTL=no\nPEERDNS=yes\nIPV6INIT=no\n"
              "PERSISTENT_DHCLIENT=yes\nNM_CONTROLLED=yes\n")


def rhel_root(root: Path, ifcfg: str | None = IFCFG_ETH0, network: str | None = SYSCONFIG_NETWORK,
              nm_enabled: bool = True) -> Path:
    put(root, "/etc/os-release", 'ID="rhel"\n')
    put(root, "/usr/lib/systemd/system/NetworkManager.service",
        "[Service]\nExecStart=/usr/sbin/NetworkManager --no-daemon\n[Install]\nWantedBy=multi-user.target\n")
    if nm_enabled:
        link(root, "/etc/systemd/system/multi-user.target.wants/NetworkManager.service",
             "/usr/lib/systemd/system/NetworkManager.service")
    if network is not None:
        put(root, "/etc/sysconfig/network", network)
    if ifcfg is not None:
        put(root, "/etc/sysconfig/network-scripts/ifcfg-eth0", ifcfg)
    return root


@needs_systemctl
def test_rhel_network_passes_with_the_guides_files(tmp_path: Path) -> None:
    st, summary, ev = run_check("standard.rhel-network", rhel_root(tmp_path), "rhel-9")
    assert st is Status.PASS, (summary, ev)
    assert "eth0 by ifcfg-eth0" in summary


@needs_systemctl
def test_rhel_network_accepts_a_networkmanager_keyfile_for_eth0(tmp_path: Path) -> None:
    root = rhel_root(tmp_path, ifcfg=None)
    put(root, "/etc/NetworkManager/system-connections/eth0.nmconnection",
        "[connection]\nid=System eth0\ntype=ethernet\ninterface-name=eth0\nautoconnect=true\n\n[ipv4]\nmethod=auto\n",
        0o600)
    st, summary, _ = run_check("standard.rhel-network", root, "rhel-9")
    assert st is Status.PASS and "keyfile /etc/NetworkManager/system-connections/eth0.nmconnection" in summary
    put(root, "/etc/NetworkManager/system-connections/eth0.nmconnection",
        "[connection]\ninterface-name=eth0\n[ipv4]\nmethod=manual\naddress1=10.0.0.4/24\n", 0o600)
    st, summary, _ = run_check("standard.rhel-network", root, "rhel-9")
    assert st is Status.FAIL and "ipv4 method=manual" in summary


@needs_systemctl
@pytest.mark.parametrize(("change", "expected"), [
    ({"network": "NETWORKING=no\n"}, "does not say NETWORKING=yes"),
    ({"network": None}, "/etc/sysconfig/network is missing"),
    ({"ifcfg": IFCFG_ETH0.replace("BOOTPROTO=dhcp", "BOOTPROTO=none")}, "BOOTPROTO=none (needs dhcp)"),
    ({"ifcfg": IFCFG_ETH0.replace("ONBOOT=yes", "ONBOOT=no")}, "ONBOOT=no (needs yes)"),
    ({"ifcfg": IFCFG_ETH0.replace("NM_CONTROLLED=yes", "NM_CONTROLLED=no")}, "NM_CONTROLLED=no"),
    ({"ifcfg": None}, "no configuration for eth0"),
    ({"nm_enabled": False}, "NetworkManager.service is disabled, not enabled"),
])
def test_rhel_network_fails(tmp_path: Path, change: dict[str, object], expected: str) -> None:
    root = rhel_root(tmp_path, **change)  # type: ignore[arg-type]
    st, summary, _ = run_check("standard.rhel-network", root, "almalinux-9")
    assert st is Status.FAIL and expected in summary, summary


def test_rhel_network_does_not_apply_to_debian(tmp_path: Path) -> None:
    st, _, _ = run_check("standard.rhel-network", tmp_path, "debian-12")
    assert st is Status.SKIP


# --- SUSE DHCP hostname -------------------------------------------------------------------------------------


def test_suse_dhcp_hostname(tmp_path: Path) -> None:
    put(tmp_path, "/etc/sysconfig/network/dhcp", 'DHCLIENT_SEND_HOSTNAME="yes"\nDHCLIENT_SET_HOSTNAME="no"\n')
    assert run_check("standard.suse-dhcp-hostname", tmp_path, "sles-15")[0] is Status.PASS
    put(tmp_path, "/etc/sysconfig/network/dhcp", 'DHCLIENT_SET_HOSTNAME="yes"\n')
    st, summary, _ = run_check("standard.suse-dhcp-hostname", tmp_path, "sles-15")
    assert st is Status.FAIL and 'DHCLIENT_SET_HOSTNAME="yes"' in summary
    put(tmp_path, "/etc/sysconfig/network/dhcp", "# nothing set\n")
    st, summary, _ = run_check("standard.suse-dhcp-hostname", tmp_path, "opensuse-leap-15")
    assert st is Status.FAIL and "no DHCLIENT_SET_HOSTNAME line" in summary
    (tmp_path / "etc/sysconfig/network/dhcp").unlink()
    st, summary, _ = run_check("standard.suse-dhcp-hostname", tmp_path, "sles-15")
    assert st is Status.FAIL and "does not exist" in summary


# --- repositories -------------------------------------------------------------------------------------------------

MIRROR = "http://mirror.invalid/debian"


def test_debian_repositories_one_line_and_deb822(tmp_path: Path) -> None:
    put(tmp_path, "/etc/os-release", 'ID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n')
    put(tmp_path, "/etc/apt/sources.list",
        f"deb {MIRROR} bookworm main\ndeb {MIRROR}-security bookworm-security main\n")
    st, summary, _ = run_check("standard.repositories", tmp_path)
    assert st is Status.PASS and "bookworm" in summary
    put(tmp_path, "/etc/apt/sources.list", f"# deb {MIRROR} bookworm main\ndeb {MIRROR} sid main\n")
    st, summary, _ = run_check("standard.repositories", tmp_path)
    assert st is Status.FAIL and "suite(s) bookworm" in summary
    put(tmp_path, "/etc/apt/sources.list.d/debian.sources",
        f"Types: deb\nURIs: {MIRROR}\nSuites: bookworm bookworm-updates\nComponents: main\n")
    assert run_check("standard.repositories", tmp_path)[0] is Status.PASS


def test_no_apt_sources_fails(tmp_path: Path) -> None:
    put(tmp_path, "/etc/os-release", "ID=debian\nVERSION_CODENAME=trixie\n")
    st, summary, _ = run_check("standard.repositories", tmp_path, "debian-13")
    assert st is Status.FAIL and "configured: none" in summary


def test_ubuntu_needs_updates_and_security(tmp_path: Path) -> None:
    put(tmp_path, "/etc/os-release", "ID=ubuntu\nVERSION_CODENAME=noble\n")
    put(tmp_path, "/etc/apt/sources.list", "deb http://archive.invalid/ubuntu noble main\n")
    st, summary, _ = run_check("standard.repositories", tmp_path, "ubuntu-24.04")
    assert st is Status.FAIL and "noble-updates, noble-security" in summary


def test_rhel_repositories(tmp_path: Path) -> None:
    put(tmp_path, "/etc/os-release", 'ID="almalinux"\n')
    put(tmp_path, "/etc/yum.repos.d/almalinux.repo",
        "[baseos]\nname=AlmaLinux $releasever - BaseOS\nenabled=1\n\n[appstream]\nname=AppStream\nenabled=0\n")
    st, summary, _ = run_check("standard.repositories", tmp_path, "almalinux-9")
    assert st is Status.FAIL and "BaseOS and AppStream" in summary
    put(tmp_path, "/etc/yum.repos.d/almalinux.repo", "[baseos]\nenabled=1\n[appstream]\nenabled=1\n")
    assert run_check("standard.repositories", tmp_path, "almalinux-9")[0] is Status.PASS


def test_oracle_needs_a_latest_repository(tmp_path: Path) -> None:
    put(tmp_path, "/etc/os-release", 'ID="ol"\n')
    put(tmp_path, "/etc/yum.repos.d/oracle-linux-ol9.repo", "[ol9_baseos_latest]\nenabled=1\n")
    assert run_check("standard.repositories", tmp_path, "oraclelinux-9")[0] is Status.PASS
    put(tmp_path, "/etc/yum.repos.d/oracle-linux-ol9.repo", "[ol9_baseos_latest]\nenabled=0\n")
    assert run_check("standard.repositories", tmp_path, "oraclelinux-9")[0] is Status.FAIL


def test_suse_repositories(tmp_path: Path) -> None:
    put(tmp_path, "/etc/os-release", 'ID="sles"\n')
    put(tmp_path, "/etc/zypp/repos.d/pool.repo", "[SLE-Module-Basesystem15-SP6-Pool]\nenabled=1\nautorefresh=0\n")
    st, summary, _ = run_check("standard.repositories", tmp_path, "sles-15")
    assert st is Status.FAIL and "no Updates repository" in summary
    put(tmp_path, "/etc/zypp/repos.d/upd.repo", "[SLE-Module-Basesystem15-SP6-Updates]\nenabled=1\nautorefresh=1\n")
    assert run_check("standard.repositories", tmp_path, "sles-15")[0] is Status.PASS
    shutil.rmtree(tmp_path / "etc/zypp")
    put(tmp_path, "/etc/os-release", 'ID="opensuse-leap"\n')
    put(tmp_path, "/etc/zypp/repos.d/oss.repo", "[repo-oss]\nname=Main Repository\nenabled=1\nautorefresh=1\n")
    upd = "[repo-update]\nname=Main Update Repository\nenabled=1\nautorefresh="
    put(tmp_path, "/etc/zypp/repos.d/upd.repo", upd + "0\n")
    st, summary, _ = run_check("standard.repositories", tmp_path, "opensuse-leap-15")
    assert st is Status.FAIL and "update" in summary  # not refreshed
    put(tmp_path, "/etc/zypp/repos.d/upd.repo", upd + "1\n")
    assert run_check("standard.repositories", tmp_path, "opensuse-leap-15")[0] is Status.PASS


# --- fail closed ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [(1, "", "sudo: a password is required"), (0, "", ""),
                                    (0, "unit hv-kvp-daemon.service file /x\n", ""), (124, "", "timed out")],
                         ids=["sudo-refused", "empty", "cut-short", "timeout"])
@pytest.mark.parametrize("check_id", FAMILY_CHECKS)
def test_a_probe_that_did_not_work_is_an_error(check_id: str, answer: tuple[int, str, str]) -> None:
    distro_id = {"standard.rhel-network": "rhel-9", "standard.suse-dhcp-hostname": "sles-15"}.get(check_id, "debian-12")
    ctx = CheckContext(guest=BrokenGuest(*answer), distro=distros.get(distro_id), profile=PROFILE)
    r = catalogue()[check_id].run(ctx)
    assert r.status is Status.ERROR, (r.summary, r.evidence)
    assert "$ " in r.evidence


def test_every_family_check_is_registered() -> None:
    cat = catalogue()
    assert [c for c in FAMILY_CHECKS if c not in cat] == []
