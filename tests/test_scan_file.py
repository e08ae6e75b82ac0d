"""``scan FILE``: the offline leak scan of an image file from anywhere, with no build VM to name.

Fast lane: the rules over a plain tree find a leftover build user by what it left, told no name. VM lane
(marker ``vm``: these build disk images): images made from Debian packages by a recipe of their own
(:mod:`tests.byoi`), clean and dirty, in several formats, scanned through the task as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from imagekit.scan.rules import ScanInput, leftover_users, scan_tree
from tests import byoi

BUILD_USER = "azureuser"
# What `waagent -force -deprovision+user` leaves when no ovf-env.xml was present: it skips deleting the
# user, so the account, its home with authorized_keys and waagent's passwordless sudoers rule stay.
SURVIVOR = {
    "/etc/passwd": f"{BUILD_USER}:x:1000:1000:{BUILD_USER}:/home/{BUILD_USER}:/bin/bash\n",
    "/etc/shadow": f"{BUILD_USER}:!:20000:0:99999:7:::\n",
    "/etc/group": f"{BUILD_USER}:x:1000:\n",
    "/etc/sudoers.d/waagent": f"{BUILD_USER} ALL=(ALL) NOPASSWD: ALL\n",
    f"/home/{BUILD_USER}/.ssh/authorized_keys": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB9 build@host\n",
    "/var/log/auth.log": f"sshd[812]: Accepted publickey for {BUILD_USER} from 10.0.2.2 port 51234 ssh2\n",
}
SURVIVOR_FOUND = [
    # the account's name in /etc files is reported too (as for a name the build gives)
    ("config-secret", "/etc/group"), ("config-secret", "/etc/passwd"), ("config-secret", "/etc/shadow"),
    ("config-secret", "/etc/sudoers.d/waagent"),
    ("home", f"/home/{BUILD_USER}"), ("log-secret", "/var/log/auth.log"),
    ("user", "/etc/group"), ("user", "/etc/passwd"), ("user", "/etc/shadow"), ("user", "/etc/sudoers.d/waagent"),
]


def _plant_survivor(root: Path) -> None:
    for rel, text in SURVIVOR.items():
        p = root / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a") as fh:
            fh.write(text)


def _minimal_tree(root: Path) -> None:
    byoi.write(root, "/etc/passwd", "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/bin/false\n")
    byoi.write(root, "/etc/shadow", "root:*:19000:0:99999:7:::\n", 0o640)
    byoi.write(root, "/etc/group", "root:x:0:\nsudo:x:27:\n")
    byoi.write(root, "/etc/sudoers", "Defaults env_reset\nroot ALL=(ALL:ALL) ALL\n%sudo ALL=(ALL:ALL) ALL\n"
               "@includedir /etc/sudoers.d\n", 0o440)
    byoi.write(root, "/etc/sudoers.d/README", "# files here are read by sudo\n", 0o440)
    byoi.write(root, "/etc/machine-id", "")
    (root / "home").mkdir()


def test_no_name_scan_finds_the_surviving_build_user(tmp_path: Path) -> None:
    _minimal_tree(tmp_path)
    assert scan_tree(tmp_path, ScanInput()) == []
    _plant_survivor(tmp_path)
    assert leftover_users(tmp_path) == [BUILD_USER]
    findings = scan_tree(tmp_path, ScanInput())
    assert sorted({(f.kind, f.path) for f in findings}) == SURVIVOR_FOUND, findings
    details = {f.path: f.detail for f in findings if f.kind in ("home",)}
    assert "authorized_keys" in details[f"/home/{BUILD_USER}"]
    sudo = [f.detail for f in findings if f.path == "/etc/sudoers.d/waagent" and f.kind == "user"]
    assert sudo == [f"a sudoers rule for the user {BUILD_USER!r} without a password (NOPASSWD)"]


@pytest.mark.parametrize(("line", "user"), [
    ("deploy ALL=(ALL) NOPASSWD:ALL\n", "deploy"),  # a user the image has no account for
    ("alice,bob ALL=(ALL) ALL\n", "alice"),
])
def test_sudoers_rules_that_name_a_user_are_found(tmp_path: Path, line: str, user: str) -> None:
    _minimal_tree(tmp_path)
    byoi.write(tmp_path, "/etc/sudoers.d/90-cloud-init-users", "# Created by cloud-init\n" + line, 0o440)
    found = [(f.kind, f.path) for f in scan_tree(tmp_path, ScanInput())]
    assert ("user", "/etc/sudoers.d/90-cloud-init-users") in found
    assert user in leftover_users(tmp_path)


def test_sudoers_group_rules_aliases_and_skipped_files_are_not_findings(tmp_path: Path) -> None:
    _minimal_tree(tmp_path)
    byoi.write(tmp_path, "/etc/sudoers.d/10-ops", "User_Alias OPS = %ops\nCmnd_Alias UP = /usr/bin/apt\n"
               "%ops ALL=(ALL) UP\nDefaults:%ops !lecture\n", 0o440)
    byoi.write(tmp_path, "/etc/sudoers.d/old.dpkg-old", "mallory ALL=(ALL) ALL\n", 0o440)  # sudo skips names with '.'
    assert scan_tree(tmp_path, ScanInput()) == []


def test_a_member_of_the_sudo_group_is_found(tmp_path: Path) -> None:
    _minimal_tree(tmp_path)
    byoi.write(tmp_path, "/etc/group", "root:x:0:\nsudo:x:27:builder\n")
    assert [(f.kind, f.detail) for f in scan_tree(tmp_path, ScanInput())] == [
        ("user", "'builder' is a member of the administrators' group 'sudo'")]


# --- VM lane: image files made by another recipe, scanned through the task -----------------------------------

from imagekit.core.paths import REPO_ROOT  # noqa: E402
from imagekit.core.run import which  # noqa: E402

needs_root_tools = pytest.mark.skipif(os.geteuid() != 0 or which("mmdebstrap") is None or which("debugfs") is None,
                                      reason="needs root (loop mounts), mmdebstrap and debugfs")
INVOKE = byoi.INVOKE


cli = byoi.cli


@pytest.fixture(scope="module")
def scan_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.test_leakscan import LEAKS

    base = byoi.base_disks()
    tree = byoi.debian_tree()
    d = tmp_path_factory.mktemp("byoi-scan")
    out = {"gpt-raw": base["gpt"], "mbr-raw": base["mbr"],
           "gpt-qcow2": byoi.convert(base["gpt"], "qcow2", d / "gpt.qcow2"),
           "gpt-vhd-fixed": byoi.convert(base["gpt"], "vpc-fixed", d / "gpt-fixed.vhd"),
           "gpt-vhd-dynamic": byoi.convert(base["gpt"], "vpc", d / "gpt-dynamic.vhd")}
    # the surviving build user, as a qcow2 (the format a build tool hands over)
    survivor = byoi.sparse_copy(base["mbr"], d / "survivor.raw")
    files: dict[str, str | bytes] = {}
    for rel, text in SURVIVOR.items():
        old = tree / rel.lstrip("/")
        files[rel] = (old.read_text() if old.is_file() else "") + text
    byoi.put(survivor, byoi.ROOT_START_MIB, files, mkdirs=(f"/home/{BUILD_USER}", f"/home/{BUILD_USER}/.ssh"))
    out["survivor-qcow2"] = byoi.convert(survivor, "qcow2", d / "survivor.qcow2")
    survivor.unlink()
    # every leak the scan knows that needs no name from the build, all at once, as a VMDK
    root = byoi.copy_tree(tree, d / "root")
    for name in sorted(NAMELESS_LEAKS):
        LEAKS[name][0](root)
    byoi.write(root, "/var/lib/dbus/machine-id", "0123456789abcdef0123456789abcdef\n")
    dirty = byoi.gpt_uefi_disk(root, d / "dirty.raw", d)
    fstab = (root / "etc/fstab").read_text() + ("/dev/disk/cloud/azure_resource-part1 /mnt/resource auto "
                                                "defaults,nofail,comment=cloudconfig 0 2\n")
    byoi.put(dirty, byoi.GPT_ROOT_MIB, {"/etc/fstab": fstab})
    byoi.debugfs(dirty, byoi.GPT_ROOT_MIB, "ssv state 0")  # not cleanly unmounted, as after a killed VM
    subprocess.run(["rm", "-rf", str(root)], check=True)
    out["dirty-vmdk"] = byoi.convert(dirty, "vmdk", d / "dirty.vmdk")
    dirty.unlink()
    return out


# The leaks of test_leakscan that a scan told no name still finds: the build VM's host name and password
# are not in the image to be found, so those two are left out.
NAMELESS_LEAKS = {"user account", "home directory", "root password", "root authorized keys", "ssh host key",
                  "waagent provisioned marker", "waagent ovf-env.xml", "cloud-init instance",
                  "cloud-init instance link", "bash history", "python history", "dhcp lease", "machine-id",
                  "test shim file", "username in a log", "username in a rotated gz log",
                  "username in a binary journal", "sudoers line for the user"}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.mark.vm
@needs_root_tools
@pytest.mark.parametrize(("name", "label"), [("gpt-raw", "raw"), ("gpt-qcow2", "qcow2"),
                                             ("gpt-vhd-fixed", "VHD (fixed)"), ("gpt-vhd-dynamic", "VHD (dynamic)"),
                                             ("mbr-raw", "raw")])
def test_clean_image_has_no_findings(scan_images: dict[str, Path], cache: Path, name: str, label: str) -> None:
    image = scan_images[name]
    before = byoi.sha256(image)
    res = cli(cache, "scan", str(image))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines() == [f"{image}: {label}, Debian GNU/Linux 12 (bookworm)", "no findings"]
    assert byoi.sha256(image) == before
    assert not list((cache / "inspect").glob("run-*"))


@pytest.mark.vm
@needs_root_tools
def test_surviving_build_user_must_not_ship(scan_images: dict[str, Path], cache: Path) -> None:
    """The issue's example: ``waagent -force -deprovision+user`` with no ovf-env.xml left the build user."""
    image = scan_images["survivor-qcow2"]
    before = byoi.sha256(image)
    res = cli(cache, "scan", str(image))
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout.splitlines()
    assert out[-1] == f"{len(out) - 2} finding(s): this image must not ship"
    assert f"  user             /etc/passwd: regular user account {BUILD_USER!r} (uid 1000)" in out
    assert (f"  home             /home/{BUILD_USER}: a home directory left in the image (with "
            ".ssh/authorized_keys: SSH keys that log in to every VM made from it)") in out
    assert (f"  user             /etc/sudoers.d/waagent: a sudoers rule for the user {BUILD_USER!r} without a "
            "password (NOPASSWD)") in out
    assert "  log-secret       /var/log/auth.log: contains the provisioned username" in out
    res = cli(cache, "scan", "--json", str(image))
    assert res.returncode == 1
    found = sorted({(f["kind"], f["path"]) for f in json.loads(res.stdout)["findings"]})
    assert found == SURVIVOR_FOUND
    assert byoi.sha256(image) == before


@pytest.mark.vm
@needs_root_tools
def test_every_leak_kind_is_found_without_names(scan_images: dict[str, Path], cache: Path) -> None:
    from tests.test_leakscan import LEAKS

    res = cli(cache, "scan", "--json", str(scan_images["dirty-vmdk"]))
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    assert report["format"] == "vmdk"
    found = {(f["kind"], f["path"]) for f in report["findings"]}
    want = {(LEAKS[n][1], LEAKS[n][2]) for n in NAMELESS_LEAKS}
    want |= {("machine-id", "/var/lib/dbus/machine-id"), ("fstab", "/etc/fstab"), ("filesystem", "/")}
    assert want <= found, sorted(want - found)


@pytest.mark.vm
@needs_root_tools
def test_ctrl_c_while_converting_leaves_nothing_behind(scan_images: dict[str, Path], cache: Path) -> None:
    """Ctrl-C during the raw copy of a qcow2: exit 130, the private directory with the copy is gone, nothing
    stays mounted, the input is unchanged."""
    import signal
    import time

    image = scan_images["gpt-qcow2"]
    before = byoi.sha256(image)
    env = {**os.environ, "IMAGEKIT_CACHE": str(cache)}
    proc = subprocess.Popen([str(INVOKE), "scan", str(image)], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
    while not list((cache / "inspect").glob("run-*/disk.raw")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the whole foreground group
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (out, err)
    assert "imagekit: interrupted; cleaned up" in err and "Traceback" not in err
    assert not list((cache / "inspect").glob("run-*"))
    assert str(cache) not in Path("/proc/self/mountinfo").read_text()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert str(cache) not in loops
    assert byoi.sha256(image) == before
