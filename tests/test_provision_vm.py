"""Provisioning on the local platform, end to end: the image's own agent against the emulated fabric.

One provisioned VM per configuration (module-scoped, one at a time) serves several assertions. The
fault tests each boot their own VM: an OVF the agent rejects, QEMU killed mid-run, SSH that never
comes up.
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

from imagekit.config import distros
from imagekit.core.errors import ProvisioningError, VMError
from imagekit.core.paths import cache_dir
from imagekit.provision.launch import ProvisionedVM, provision
from imagekit.vm import kept

pytestmark = pytest.mark.vm

CONFIGS = ["debian-12", "debian-13", "debian-12-cloudinit", "debian-13-cloudinit"]

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


@pytest.fixture(scope="module", params=CONFIGS)
def pvm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProvisionedVM]:
    workdir = tmp_path_factory.mktemp("prov")
    with provision(distros.get(request.param), workdir=workdir) as p:
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
