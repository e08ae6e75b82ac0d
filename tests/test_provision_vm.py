"""Provisioning on the local platform, end to end: the image's own agent against the emulated fabric, and
the checks against the real guests it provisions.

One provisioned VM per configuration (module-scoped) serves all the assertions about it: first those that
only look (Ready, SSH, what the guest sees and reaches), then the checks — each agent's own resource-disk
code runs (waagent through the /run shim, cloud-init through CustomData), the resource-disk, swap and
provisioning checks pass for real, faults made on purpose in the throwaway VM are caught, and the undo leaves
nothing of the set-up outside /run. The fault tests each boot their own VM: an OVF the agent rejects, QEMU
killed mid-run, SSH that never comes up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagekit.checkrun import CheckOutcome, check_provisioned
from imagekit.checks import (
    CheckContext,
    Status,
    activate_resource_disk,
    catalogue,
    plan_for,
    resource_disk_custom_data,
    summary_table,
    undo_test_setup,
)
from imagekit.config import distros
from imagekit.config.distros import Agent, Distro
from imagekit.config.profile import ProvisioningProfile
from imagekit.core.errors import ProvisioningError, VMError
from imagekit.core.paths import cache_dir
from imagekit.provision.launch import ProvisionedVM, provision
from imagekit.provision.resource_setup import RESOURCE_DISK, SHIM_DIR
from imagekit.vm import kept

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]

CONFIGS = ["debian-12", "debian-13", "debian-12-cloudinit", "debian-13-cloudinit"]
CI_SWAP_PERCENT = 33  # cloud-init's swap partition: a third of the resource disk

# Runs in the guest (python3 is in every image): what it can reach, as JSON.
GUEST_PROBE = r'''
import json, socket, sys, urllib.request
host_ip, host_port = sys.argv[1], int(sys.argv[2])
def http(url, headers=None):
    try:
        r = urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10)
        return [r.status, r.read(4000).decode(errors="replace")]
    except urllib.error.HTTPError as e:
        return [e.code, ""]
    except Exception as e:
        return [0, type(e).__name__ + ": " + str(e)]
def tcp(host, port):
    try:
        socket.create_connection((host, port), 5).close()
        return "connected"
    except OSError as e:
        return type(e).__name__
def resolve(name):
    try:
        return socket.gethostbyname(name)
    except OSError as e:
        return "failed: " + type(e).__name__
out = {
    "wire": http("http://168.63.129.16/?comp=versions"),
    "hostga": http("http://168.63.129.16:32526/versions"),
    "imds": http("http://169.254.169.254/metadata/instance?api-version=2021-02-01", {"Metadata": "true"}),
    "imds_no_header": http("http://169.254.169.254/metadata/instance?api-version=2021-02-01"),
    "internet_ip": tcp("1.1.1.1", 80),
    "internet_dns": resolve("example.com"),
    "host_service_via_gateway": tcp("168.63.129.16", host_port),
    "host_service_via_host_ip": tcp(host_ip, host_port),
    "own_name": resolve(socket.gethostname()),
}
print(json.dumps(out))
'''


def _host_ip() -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # picks the outgoing address; sends nothing
        return str(s.getsockname()[0])
    finally:
        s.close()


def _leftovers(name: str) -> list[str]:
    found = [str(p) for p in (cache_dir() / "vms").glob(f"{name}-*")]
    procs = subprocess.run(["pgrep", "-af", f"process=ik-{name}"], capture_output=True, text=True).stdout
    found += [ln for ln in procs.splitlines() if "pgrep" not in ln]
    return found


PASSWORD = "Ik-Check-Passw0rd!"


def _profile(d: Distro) -> ProvisioningProfile | None:
    """waagent: the default profile, no OVF password (with one, waagent's sudoers asks for it and the
    harness's ``sudo -n`` cannot run as root). cloud-init: an OVF password with password login enabled
    (its sudo rule stays NOPASSWD, and the OVF copy it leaves must have the password redacted), and the
    resource disk and a swap partition through CustomData."""
    if d.agent is not Agent.CLOUD_INIT:
        return None
    return ProvisioningProfile.create(hostname=f"ik-{d.id.split('-')[1]}ci", username="azureuser",
                                      password=PASSWORD, disable_password_auth=False,
                                      custom_data=resource_disk_custom_data(d, swap_percent=CI_SWAP_PERCENT))


@pytest.fixture(scope="module", params=CONFIGS)
def pvm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProvisionedVM]:
    d = distros.get(request.param)
    workdir = tmp_path_factory.mktemp("prov")
    with provision(d, workdir=workdir, profile=_profile(d)) as p:
        yield p
    assert not p.private_key.exists(), "the throwaway private key outlived the VM"
    assert _leftovers(p.vm.name) == []


def test_ready_and_ssh(pvm: ProvisionedVM) -> None:
    assert pvm.ready_report is not None and pvm.ready_report.state == "Ready"
    t = pvm.timings.as_dict()
    assert t["ready"] <= t["ssh ready"]
    who = pvm.guest.run("id -un", sudo=False)
    assert who.ok and who.stdout.strip() == pvm.profile.username
    root = pvm.guest.run("id -u")
    assert root.ok and root.stdout.strip() == "0", root.evidence()
    failing = pvm.guest.run("exit 3", sudo=False)
    assert failing.returncode == 3 and not failing.ok
    assert pvm.guest.run("hostname", sudo=False).stdout.strip() == pvm.profile.hostname
    # cloud-init reports the host keys on the console; waagent does not, so the key is trusted on first use.
    expected = "reported" if pvm.distro.agent.value == "cloud-init" else "first use"
    assert pvm.host_key_source == expected


def test_guest_sees_azure(pvm: ProvisionedVM) -> None:
    res = pvm.guest.run("systemd-detect-virt", sudo=False)
    assert res.stdout.strip() == "microsoft", res.evidence()
    dvd = pvm.guest.run("readlink -f /dev/disk/by-id/ata-QEMU_DVD-ROM_QM00003; "
                        "readlink -f /dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_RESOURCEDISK", sudo=False)
    assert dvd.stdout.split()[0] == "/dev/sr0", dvd.evidence()
    assert dvd.stdout.split()[1].startswith("/dev/sd"), dvd.evidence()


@pytest.mark.parametrize("pvm", ["debian-12"], indirect=True)
def test_waagent_starts_on_the_network_not_after_the_whole_boot(pvm: ProvisionedVM) -> None:
    """The image orders waagent after network-online.target (a default route, through ifupdown's wait-online
    service) and sshd instead of multi-user.target, and first boot makes one host key that waagent then
    replaces with its own set: the agent found the WireServer route on its first look, no retry."""
    unit = pvm.guest.run("systemctl show -p After -p Wants walinuxagent.service; "
                         "systemctl is-active ifupdown-wait-online.service; ls /etc/ssh")
    after = next(ln for ln in unit.stdout.splitlines() if ln.startswith("After="))
    assert "network-online.target" in after and "ssh.service" in after, unit.evidence()
    assert "multi-user.target" not in after, unit.evidence()
    assert "\nactive\n" in unit.stdout, unit.evidence()
    # Provisioning.SshHostKeyPairType=auto: waagent's ssh-keygen -A made RSA too (first boot made only Ed25519).
    assert "ssh_host_rsa_key.pub" in unit.stdout and "ssh_host_ed25519_key.pub" in unit.stdout, unit.evidence()
    log = pvm.guest.run("grep -iE 'route to 168.63.129.16|route exists|Retry detect protocol|Waiting for network' "
                        "/var/log/waagent.log")
    assert "Route to 168.63.129.16 exists" in log.stdout, log.evidence()
    assert "No route exists" not in log.stdout and "Retry detect protocol" not in log.stdout, log.evidence()
    assert "Waiting for network" not in log.stdout, log.evidence()


def test_guest_reaches_the_emulator_and_nothing_else(pvm: ProvisionedVM, host_listener: int) -> None:
    pvm.guest.write_file("/tmp/ik-probe.py", GUEST_PROBE.encode(), sudo=False)
    res = pvm.guest.run(f"python3 /tmp/ik-probe.py {_host_ip()} {host_listener}", sudo=False, timeout=180)
    assert res.ok, res.evidence()
    out = json.loads(res.stdout)
    assert out["wire"][0] == 200 and "<Versions>" in out["wire"][1]
    assert out["hostga"][0] == 200 and "2015-09-01" in out["hostga"][1]
    assert out["imds"][0] == 200
    assert json.loads(out["imds"][1])["compute"]["osProfile"]["computerName"] == pvm.profile.hostname
    assert out["imds_no_header"][0] == 400  # as Azure answers without Metadata: true
    assert out["internet_ip"] != "connected"
    assert out["internet_dns"].startswith("failed")
    assert out["host_service_via_gateway"] != "connected"
    assert out["host_service_via_host_ip"] != "connected"
    # Azure's DNS resolves the VM's own name; so does the emulator's.
    assert out["own_name"] == "168.63.129.100"


# --- the checks, on the same VMs (each of these changes its VM, so it comes after the tests above) ------

MUST_PASS = (
    "resource-disk.mounted", "swap.resource-disk", "swap.not-on-os-disk",
    "provisioning.user", "provisioning.password-auth", "provisioning.sudo", "provisioning.marker",
    "provisioning.ovf-redacted", "provisioning.ready-reported", "provisioning.agent-running",
)


def _by_id(outcome: CheckOutcome) -> dict[str, tuple[Status, str, str]]:
    print(summary_table(outcome.runs, colour=False))
    return {r.check.id: (r.result.status, r.result.summary, r.result.evidence) for r in outcome.runs}


def _assert_passed(results: dict[str, tuple[Status, str, str]], ids: tuple[str, ...]) -> None:
    bad = {cid: (results[cid][1], results[cid][2][-1500:]) for cid in ids if results[cid][0] is not Status.PASS}
    assert bad == {}
    crashed = {cid: r[1] for cid, r in results.items() if r[0] is Status.ERROR}
    assert crashed == {}


def _assert_reports(outcome: CheckOutcome) -> None:
    for p in outcome.reports.values():
        assert p.stat().st_size > 0
        assert PASSWORD not in p.read_text()


@pytest.mark.parametrize("pvm", ["debian-12"], indirect=True)
def test_debian12_waagent_resource_disk_swap_file_and_provisioning(pvm: ProvisionedVM, tmp_path: Path) -> None:
    d = pvm.distro
    # The same VM as the tests above: this test changes it, so it runs last for its configuration.
    outcome = check_provisioned(pvm, report_dir=tmp_path / "report")
    results = _by_id(outcome)
    _assert_passed(results, (*MUST_PASS, "resource-disk.readme"))
    assert "swapfile of 256 MiB is active" in results["swap.resource-disk"][1]
    assert "VMBus" in results["resource-disk.mounted"][2] and "bypassed" in results["resource-disk.mounted"][2]
    # waagent's own resource-disk code ran (its log lines), against the shim's answer.
    log = pvm.guest.run("grep -E 'imagekit test shim|Resource disk|Enabled .*swap' /var/log/waagent.log")
    assert "imagekit test shim: device_for_ide_port(1) -> sd" in log.stdout
    assert "is mounted at /mnt/resource with ext4" in log.stdout
    assert "no UserPassword element" in results["provisioning.ovf-redacted"][1]

    # Wrong on purpose, in this throwaway VM: a swap size larger than the 2 GiB resource disk. The agent
    # runs again (its own code) and the swap check must fail, with the agent's own log as evidence.
    changed = pvm.guest.run("sed -i 's/^ResourceDisk.SwapSizeMB=.*/ResourceDisk.SwapSizeMB=4096/' "
                            "/etc/waagent.conf && swapoff /mnt/resource/swapfile")
    assert changed.ok, changed.evidence()
    activate_resource_disk(pvm.guest, plan_for(d), timeout=600)
    ctx = CheckContext(guest=pvm.guest, distro=d, profile=pvm.profile, plan=plan_for(d))
    big = catalogue()["swap.resource-disk"].run(ctx)
    print(big.summary, big.evidence, sep="\n")
    assert big.status is Status.FAIL
    assert "SwapSizeMB=4096 does not fit on the resource disk (2048 MiB)" in big.summary
    assert "ResourceDisk.SwapSizeMB=4096" in big.evidence and "dd unsuccessful" in big.evidence

    # More ways to get an image wrong, made for real in this throwaway VM; each check must catch its own.
    def broken(setup: str, check_id: str) -> tuple[Status, str, str]:
        res = pvm.guest.run(setup)
        assert res.ok, res.evidence()
        r = catalogue()[check_id].run(CheckContext(guest=pvm.guest, distro=d, profile=pvm.profile))
        print(check_id, r.summary, sep=": ")
        return r.status, r.summary, r.evidence

    st, summary, ev = broken("dd if=/dev/zero of=/os-swap bs=1M count=32 status=none && chmod 600 /os-swap "
                             "&& mkswap /os-swap >/dev/null && swapon /os-swap", "swap.not-on-os-disk")
    assert st is Status.FAIL and "active swap /os-swap (file) is on the OS disk /dev/sda" in summary, ev
    pvm.guest.run("swapoff /os-swap; rm -f /os-swap")
    st, summary, ev = broken(
        "useradd -m -p \"$(openssl passwd -6 leftover-pw)\" leftover && mkdir -p /home/leftover/.ssh && "
        "echo 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEu0leftoverkeyleftoverkeyleftoverkeyleft x@build' "
        "> /home/leftover/.ssh/authorized_keys", "standard.no-preexisting-users")
    assert st is Status.FAIL and "user leftover (uid=" in summary and "leftover has a password" in summary
    assert "leftover has SSH keys" in summary and "leftover-pw" not in ev and "$6$" not in ev
    st, summary, ev = broken("grep -rlis '^ *ClientAliveInterval' /etc/ssh/sshd_config /etc/ssh/sshd_config.d "
                             "| xargs -r sed -i '/^ *[Cc]lient[Aa]live[Ii]nterval/d'",
                             "standard.client-alive-interval")
    assert st is Status.FAIL and "ClientAliveInterval is 0 (0 means unset)" in summary, ev
    assert "no ClientAliveInterval line" in ev

    done = undo_test_setup(pvm.guest, d)
    state = pvm.guest.run(f"ls {SHIM_DIR}; ls /run/systemd/system/walinuxagent.service.d; cat /proc/swaps; "
                          "findmnt -n /mnt/resource; cat /etc/fstab")
    assert "swapoff /mnt/resource/swapfile" in done
    assert "/mnt/resource/swapfile" not in state.stdout
    assert "No such file" in state.stderr and "imagekit" not in state.stdout
    assert RESOURCE_DISK not in state.stdout
    _assert_reports(outcome)


@pytest.mark.parametrize("pvm", ["debian-12-cloudinit", "debian-13-cloudinit"], indirect=True)
def test_cloudinit_resource_disk_and_swap_partition(pvm: ProvisionedVM, tmp_path: Path) -> None:
    """cloud-init 22.4 (Debian 12) and 25.1 (Debian 13), provisioned with an OVF password (see _profile)."""
    d = pvm.distro
    plan = plan_for(d, swap_percent=CI_SWAP_PERCENT)
    # The same VM as the tests above: this test changes it, so it runs last for its configuration.
    outcome = check_provisioned(pvm, plan=plan, report_dir=tmp_path / "report")
    results = _by_id(outcome)
    _assert_passed(results, MUST_PASS)
    assert "redacted as 'REDACTED'" in results["provisioning.ovf-redacted"][1]
    assert "PasswordAuthentication yes, as the OVF asks" in results["provisioning.password-auth"][1]
    assert results["resource-disk.readme"][0] is Status.SKIP
    assert "swap partition" in results["swap.resource-disk"][1]
    assert "device_aliases" in results["resource-disk.mounted"][2]
    before = pvm.guest.run("grep -c comment=cloudconfig /etc/fstab")
    assert int(before.stdout.strip() or 0) >= 2  # cloud-init wrote the mount and the swap line
    done = undo_test_setup(pvm.guest, d, plan)
    after = pvm.guest.run(f"grep -F {RESOURCE_DISK} /etc/fstab; cat /proc/swaps; findmnt -n /mnt")
    assert RESOURCE_DISK not in after.stdout and "partition" not in after.stdout
    assert any("removed from /etc/fstab" in x for x in done)
    _assert_reports(outcome)


@pytest.mark.parametrize("pvm", ["debian-13"], indirect=True)
def test_debian13_waagent_swap_disabled(pvm: ProvisionedVM, tmp_path: Path) -> None:
    d = pvm.distro
    assert not d.swap_enabled
    # The same VM as the tests above: this test changes it, so it runs last for its configuration.
    outcome = check_provisioned(pvm, report_dir=tmp_path / "report")
    results = _by_id(outcome)
    _assert_passed(results, (*MUST_PASS, "resource-disk.readme"))
    assert "swap disabled" in results["swap.resource-disk"][1]
    undo_test_setup(pvm.guest, d)
    _assert_reports(outcome)


# --- faults -------------------------------------------------------------------------------------------


def test_ovf_the_agent_rejects_fails_with_its_description(tmp_path: Path) -> None:
    def drop_provision_guest_agent(xml: str) -> str:
        out, n = re.subn(r"<wa:ProvisionGuestAgent>[^<]*</wa:ProvisionGuestAgent>", "", xml)
        assert n == 1
        return out

    name = "debian-12-ovfbad-" + os.urandom(2).hex()
    with pytest.raises(ProvisioningError) as err, \
            provision(distros.get("debian-12"), workdir=tmp_path, name=name, ovf_transform=drop_provision_guest_agent):
        pytest.fail("provisioning should have failed")
    # waagent's own words, relayed through its health report.
    assert "Failed to validate OVF: ProvisionGuestAgent not found" in str(err.value)
    assert err.value.console_tail
    assert _leftovers(name) == []


def test_qemu_killed_mid_run(tmp_path: Path) -> None:
    name = "debian-12-killed-" + os.urandom(2).hex()
    console = tmp_path / name / "console.log"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            # Wait until the guest is booting (the kernel is talking), then pull the plug.
            if console.exists() and b"Linux version" in console.read_bytes():
                pids = subprocess.run(["pgrep", "-f", f"process=ik-{name}"], capture_output=True,
                                      text=True).stdout.split()
                for pid in pids:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
                return
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    with pytest.raises(VMError) as err, provision(distros.get("debian-12"), workdir=tmp_path, name=name):
        pytest.fail("provisioning should have failed")
    t.join(10)
    assert killed, "the test did not find the QEMU process to kill"
    assert "QEMU exited unexpectedly (killed by signal 9)" in str(err.value)
    # The error ends with the console as it was when QEMU died.
    tail = err.value.console_tail.splitlines()
    assert tail and tail[-1] in console.read_text(errors="replace")
    assert _leftovers(name) == []


def test_ssh_never_comes_up(tmp_path: Path) -> None:
    # cloud-init masks and stops sshd at boot: Ready comes, the login never does.
    custom = b"#cloud-config\nbootcmd:\n  - [systemctl, mask, --now, ssh.service, ssh.socket]\n"
    name = "debian-12-cloudinit-nossh-" + os.urandom(2).hex()
    with pytest.raises(ProvisioningError) as err, \
            provision(distros.get("debian-12-cloudinit"), workdir=tmp_path, name=name, custom_data=custom,
                      ssh_timeout=90):
        pytest.fail("SSH should never have come up")
    msg = str(err.value)
    assert "did not succeed within 90 s" in msg
    assert err.value.console_tail
    assert _leftovers(name) == []


# --- kept VMs -----------------------------------------------------------------------------------------

KEPT_PROBE = r'''
import json, urllib.request
def get(url, headers=None):
    r = urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=20)
    return r.read().decode()
print(json.dumps({
    "versions": get("http://168.63.129.16/?comp=versions"),
    "goal_state": get("http://168.63.129.16/machine/?comp=goalstate", {"x-ms-version": "2012-11-30"}),
    "hostga": get("http://168.63.129.16:32526/versions"),
    "imds": json.loads(get("http://169.254.169.254/metadata/instance?api-version=2021-02-01",
                           {"Metadata": "true"})),
}))
'''


def test_a_kept_vm_keeps_its_fabric_until_it_is_stopped(tmp_path: Path) -> None:
    name = "debian-12-kept-" + os.urandom(2).hex()
    with provision(distros.get("debian-12"), workdir=tmp_path, name=name, keep=True) as p:
        pass
    assert p.kept and p.fabric_keeper is not None
    keeper = p.fabric_keeper
    child = p.vm.child_pid
    assert child is not None
    try:
        # The harness's own fabric has stopped; the guest still reaches its WireServer, HostGAPlugin and IMDS.
        assert p.fabric.sockets is None
        p.guest.connect(120)
        try:
            p.guest.write_file("/tmp/ik-kept.py", KEPT_PROBE.encode(), sudo=False)
            res = p.guest.run("python3 /tmp/ik-kept.py", sudo=False, timeout=120)
            assert res.ok, res.evidence()
            out = json.loads(res.stdout)
            assert "<Versions>" in out["versions"] and "2015-09-01" in out["hostga"]
            # The same goal state as before the handover: same incarnation, container and VM id.
            assert "<Incarnation>1</Incarnation>" in out["goal_state"]
            assert f"<ContainerId>{p.fabric.identity.container_id}</ContainerId>" in out["goal_state"]
            assert out["imds"]["compute"]["vmId"] == p.fabric.identity.vm_id
            assert out["imds"]["compute"]["osProfile"]["computerName"] == p.profile.hostname
        finally:
            p.guest.close()
        assert keeper.proc.poll() is None
    finally:
        # What the printed stop instruction (./ik vm-stop --name NAME) does: the kept VM is found by its
        # record, its namespace child (QEMU goes with it) and its keeper are ended, its secrets removed.
        [listed] = [vm for vm in kept.list_kept() if vm.name == name]
        assert listed.running and listed.child.pid == child and listed.keeper is not None
        assert listed.keeper.pid == keeper.pid
        kept.stop(kept.find(name))
        rc = keeper.proc.wait(timeout=60)
        shutil.rmtree(p.vm.private_dir, ignore_errors=True)
    assert rc == 0
    assert not p.vm.private_dir.exists() and kept.process_start(child) is None
    log = (p.run_dir / "fabric-keeper.log").read_text()
    assert f"process {child} exited" in log
    assert p.profile.password is None or p.profile.password not in log
    assert _leftovers(name) == []
