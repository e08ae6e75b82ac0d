"""The offline leak scan on real disk images (ext4 built with ``mkfs.ext4 -d``; GPT + xfs), one planted leak at a time.

Each image is a partitioned disk (MBR, root partition at 1 MiB as the base images have), scanned through
the real path: partition table, blkid, a read-only loop mount in a private mount namespace.
"""

from __future__ import annotations

import gzip
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from imagekit import capture
from imagekit.core.run import which
from imagekit.scan import LeakFound, check_image, find_partitions, fstab_mounts, scan_image
from imagekit.scan.rules import ScanInput, scan_tree

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or which("mkfs.ext4") is None or which("sfdisk") is None,
    reason="needs root, mkfs.ext4 and sfdisk (loop mounts)",
)

USER = "ikbuild5e7a"
PASSWORD = "Pr0v-S3cret!x"
HOST = "ik-build-5e7a"
INP = ScanInput(usernames=[USER], hostnames=[HOST], password=PASSWORD)


def _w(root: Path, rel: str, text: str | bytes, mode: int = 0o644) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    p.chmod(mode)


def _dbus_machine_id(root: Path) -> None:
    """The D-Bus copy of the machine-id: a file of its own (the clean image has it as a link to /etc)."""
    (root / "var/lib/dbus/machine-id").unlink()
    _w(root, "/var/lib/dbus/machine-id", "0123456789abcdef\n")


def clean_tree(root: Path) -> None:
    """A generalized Debian-like root: what a correctly deprovisioned image holds in the places scanned."""
    _w(root, "/etc/passwd", "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
       "sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    _w(root, "/etc/shadow", "root:*LOCK*:14600::::::\ndaemon:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n", 0o640)
    _w(root, "/etc/group", "root:x:0:\nsudo:x:27:\n")
    _w(root, "/etc/machine-id", "")
    _w(root, "/etc/hostname", "localhost.localdomain\n")
    _w(root, "/etc/hosts", "127.0.0.1 localhost\n")
    _w(root, "/etc/fstab", "UUID=1234 / ext4 defaults,discard 0 1\n")
    _w(root, "/etc/ssh/sshd_config", "ClientAliveInterval 180\n")
    _w(root, "/etc/sudoers.d/README", "# drop-ins go here\n")
    _w(root, "/etc/waagent.conf", "Provisioning.Agent=waagent\n")
    _w(root, "/root/.bashrc", "PS1='# '\n")
    _w(root, "/var/log/dpkg.log", "2026-11-22 status installed waagent:all 2.7.3\n")
    _w(root, "/var/log/journal/.keep", "")
    (root / "home").mkdir()
    (root / "var/lib/cloud/instances").mkdir(parents=True)
    (root / "var/lib/dhcp").mkdir(parents=True)
    (root / "var/lib/dbus").mkdir(parents=True)
    os.symlink("/etc/machine-id", root / "var/lib/dbus/machine-id")


def make_disk(tmp: Path, tree: Path, name: str = "disk.raw") -> Path:
    disk = tmp / name
    with disk.open("wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], input=b"label: dos\nstart=2048, type=83\n", check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "offset=1048576", "-d", str(tree), str(disk), "63M"], check=True,
                   capture_output=True)
    return disk


Plant = Callable[[Path], None]
LEAKS: dict[str, tuple[Plant, str, str]] = {
    # name: (plant, expected kind, expected path)
    "user account": (lambda r: _w(r, "/etc/passwd", (r / "etc/passwd").read_text()
                                  + f"{USER}:x:1000:1000::/home/{USER}:/bin/bash\n"), "user", "/etc/passwd"),
    "home directory": (lambda r: _w(r, f"/home/{USER}/.ssh/authorized_keys", "ssh-ed25519 AAAA k\n"),
                       "home", f"/home/{USER}"),
    "root password": (lambda r: _w(r, "/etc/shadow", "root:$6$salt$hash:19000::::::\n"), "credentials", "/etc/shadow"),
    "root authorized keys": (lambda r: _w(r, "/root/.ssh/authorized_keys", "ssh-rsa AAAA x\n"), "credentials",
                             "/root/.ssh/authorized_keys"),
    "ssh host key": (lambda r: _w(r, "/etc/ssh/ssh_host_ed25519_key", "-----BEGIN OPENSSH PRIVATE KEY-----\n", 0o600),
                     "ssh-host-key", "/etc/ssh/ssh_host_ed25519_key"),
    "waagent provisioned marker": (lambda r: _w(r, "/var/lib/waagent/provisioned", "4b7ae7b1-0000\n"),
                                   "waagent-state", "/var/lib/waagent/provisioned"),
    "waagent ovf-env.xml": (lambda r: _w(r, "/var/lib/waagent/ovf-env.xml", "<Environment/>"),
                            "waagent-state", "/var/lib/waagent/ovf-env.xml"),
    "cloud-init instance": (lambda r: _w(r, "/var/lib/cloud/instances/4b7ae7b1/obj.pkl", b"\x80\x04"),
                            "cloud-init-state", "/var/lib/cloud/instances/4b7ae7b1"),
    "cloud-init instance link": (lambda r: os.symlink("/var/lib/cloud/instances/x", r / "var/lib/cloud/instance"),
                                 "cloud-init-state", "/var/lib/cloud/instance"),
    "bash history": (lambda r: _w(r, "/root/.bash_history", "sudo waagent -deprovision\n"), "history",
                     "/root/.bash_history"),
    "python history": (lambda r: _w(r, "/root/.python_history", "import os\n"), "history", "/root/.python_history"),
    "dhcp lease": (lambda r: _w(r, "/var/lib/dhcp/dhclient.eth0.leases", "lease {\n}\n"),
                   "dhcp-lease", "/var/lib/dhcp/dhclient.eth0.leases"),
    "machine-id": (lambda r: _w(r, "/etc/machine-id", "0123456789abcdef0123456789abcdef\n"), "machine-id",
                   "/etc/machine-id"),
    "dbus machine-id": (_dbus_machine_id, "machine-id", "/var/lib/dbus/machine-id"),
    "hostname": (lambda r: _w(r, "/etc/hostname", f"{HOST}\n"), "hostname", "/etc/hostname"),
    "fstab cloudconfig line": (lambda r: _w(r, "/etc/fstab", (r / "etc/fstab").read_text()
                                            + "/dev/disk/cloud/azure_resource-part1 /mnt/resource auto "
                                              "defaults,nofail,comment=cloudconfig 0 2\n"), "fstab", "/etc/fstab"),
    "test shim file": (lambda r: _w(r, "/etc/systemd/system/walinuxagent.service.d/imagekit-resource-disk-shim.conf",
                                    "[Service]\n"), "test-artifact",
                       "/etc/systemd/system/walinuxagent.service.d/imagekit-resource-disk-shim.conf"),
    "username in a log": (lambda r: _w(r, "/var/log/auth.log", f"sshd[1]: Accepted publickey for {USER} from x\n"),
                          "log-secret", "/var/log/auth.log"),
    "username in a rotated gz log": (lambda r: _w(r, "/var/log/syslog.2.gz", gzip.compress(
        f"useradd[9]: new user: name={USER}, UID=1000\n".encode())), "log-secret", "/var/log/syslog.2.gz"),
    "password in a log": (lambda r: _w(r, "/var/log/cloud-init.log", f"set password {PASSWORD} for user\n"),
                          "log-secret", "/var/log/cloud-init.log"),
    "username in a binary journal": (lambda r: _w(r, "/var/log/journal/abc/system.journal",
                                                  b"LPKSHHRH\x00\x01_COMM=sshd\x00USER=" + USER.encode() + b"\x00"),
                                     "log-secret", "/var/log/journal/abc/system.journal"),
    "sudoers line for the user": (lambda r: _w(r, "/etc/sudoers.d/90-cloud-init-users",
                                               f"# Created by cloud-init\n{USER} ALL=(ALL) NOPASSWD:ALL\n", 0o440),
                                  "config-secret", "/etc/sudoers.d/90-cloud-init-users"),
}


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    clean_tree(tree)
    return tree


def test_clean_image_passes(tmp_path: Path, clean: Path) -> None:
    disk = make_disk(tmp_path, clean)
    assert scan_image(disk, "raw", INP) == []
    check_image(disk, "raw", INP)  # no exception


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_each_leak_is_found_and_named(tmp_path: Path, clean: Path, leak: str) -> None:
    plant, kind, path = LEAKS[leak]
    plant(clean)
    disk = make_disk(tmp_path, clean)
    findings = scan_image(disk, "raw", INP)
    assert any(f.kind == kind and f.path == path for f in findings), findings
    # nothing unrelated is reported: the scan is precise (a passwd line for the user also shows in /etc)
    assert {f.kind for f in findings} <= {kind, "config-secret", "user"}, findings
    with pytest.raises(LeakFound) as exc:
        check_image(disk, "raw", INP)
    assert path in str(exc.value)


def test_secrets_never_appear_in_the_error(tmp_path: Path, clean: Path) -> None:
    LEAKS["password in a log"][0](clean)
    disk = make_disk(tmp_path, clean)
    with pytest.raises(LeakFound) as exc:
        check_image(disk, "raw", INP)
    assert PASSWORD not in str(exc.value)
    assert "/var/log/cloud-init.log" in str(exc.value)


def test_scan_reads_the_fixed_vhd_artifact(tmp_path: Path, clean: Path) -> None:
    """The shipped artifact itself is scanned: a fixed VHD is the raw disk plus a footer."""
    LEAKS["waagent provisioned marker"][0](clean)
    disk = make_disk(tmp_path, clean)
    vhd = tmp_path / "disk.vhd"
    capture.make_fixed_vhd(disk, vhd)
    findings = scan_image(vhd, "vpc", INP)
    assert [f.path for f in findings] == ["/var/lib/waagent/provisioned"]
    qcow = tmp_path / "disk.qcow2"
    capture.make_qcow2_zstd(disk, qcow)
    assert [f.path for f in scan_image(qcow, "qcow2", INP)] == ["/var/lib/waagent/provisioned"]


def test_scan_is_read_only_and_leaves_nothing_mounted(tmp_path: Path, clean: Path) -> None:
    LEAKS["bash history"][0](clean)
    disk = make_disk(tmp_path, clean)
    before = disk.read_bytes()
    scan_image(disk, "raw", INP)
    assert disk.read_bytes() == before
    # No loop device is left on this test's disk (other tests running beside this one may hold their own).
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert [ln for ln in loops.splitlines() if str(tmp_path) in ln] == []
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


def test_unclean_filesystem_is_reported(tmp_path: Path, clean: Path) -> None:
    disk = make_disk(tmp_path, clean)
    # mark the filesystem "not clean", as after a VM that was killed instead of shut down
    subprocess.run(["debugfs", "-w", "-R", "ssv state 0", f"{disk}?offset=1048576"], check=True, capture_output=True)
    findings = scan_image(disk, "raw", INP)
    assert [f.kind for f in findings] == ["filesystem"], findings


def test_bare_filesystem_without_partition_table(tmp_path: Path, clean: Path) -> None:
    LEAKS["machine-id"][0](clean)
    fs = tmp_path / "fs.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(clean), str(fs), "32M"], check=True, capture_output=True)
    assert [f.kind for f in scan_image(fs, "raw", INP)] == ["machine-id"]


def test_scan_tree_without_mounting(clean: Path) -> None:
    """The rules also run over a plain directory (no root needed): every planted leak at once."""
    for plant, _, _ in LEAKS.values():
        if plant is LEAKS["dbus machine-id"][0]:
            continue
        plant(clean)
    kinds = {f.kind for f in scan_tree(clean, INP)}
    assert kinds >= {k for _, k, _ in LEAKS.values()}


# --- GPT and xfs, as in the RHEL-family vendor images (AlmaLinux, Rocky, RHEL, Oracle Linux) ---------------

needs_xfs = pytest.mark.skipif(which("mkfs.xfs") is None or which("mkfs.vfat") is None,
                               reason="needs mkfs.xfs (xfsprogs) and mkfs.vfat (dosfstools)")
MIB = 1 << 20
XFS_MIB = 320  # mkfs.xfs refuses file systems under 300 MB


def _xfs_with(tmp: Path, tree: Path) -> Path:
    """An xfs file system holding ``tree``: made with mkfs.xfs, filled through a loop mount in a private
    mount namespace (the kernel drops the mount with the namespace even if the copy fails)."""
    part = tmp / "root.xfs"
    with part.open("wb") as fh:
        fh.truncate(XFS_MIB * MIB)
    subprocess.run(["mkfs.xfs", "-q", "-f", str(part)], check=True, capture_output=True)
    mnt = tmp / "fill"
    mnt.mkdir()
    subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec",
                    'mount -t xfs -o loop "$1" "$2"; cp -a "$3"/. "$2"/; umount "$2"', "fill",
                    str(part), str(mnt), str(tree)], check=True, capture_output=True)
    mnt.rmdir()
    return part


def make_gpt_xfs_disk(tmp: Path, tree: Path) -> Path:
    """GPT like a RHEL-family cloud image: BIOS boot, an EFI system partition (vfat), then xfs root."""
    esp = tmp / "esp.vfat"
    with esp.open("wb") as fh:
        fh.truncate(64 * MIB)
    subprocess.run(["mkfs.vfat", str(esp)], check=True, capture_output=True)
    root = _xfs_with(tmp, tree)
    disk = tmp / "gpt.raw"
    with disk.open("wb") as fh:
        fh.truncate((2 + 64 + XFS_MIB + 2) * MIB)
    layout = (
        "label: gpt\n"
        "start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\n"  # BIOS boot
        "start=4096, size=131072, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"  # EFI system
        f"start=135168, size={XFS_MIB * 2048}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"  # Linux filesystem
    )
    subprocess.run(["sfdisk", "-q", str(disk)], input=layout.encode(), check=True)
    for part, start_sector in ((esp, 4096), (root, 135168)):
        subprocess.run(["dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={start_sector // 2048}",
                        "conv=notrunc,sparse", "status=none"], check=True)
        part.unlink()
    return disk


@needs_xfs
def test_gpt_xfs_image_clean_and_leaking(tmp_path: Path, clean: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    disk = make_gpt_xfs_disk(tmp_path / "a", clean)
    parts = find_partitions(disk, disk.stat().st_size)
    # Only the Linux file system is scanned: not the BIOS boot gap, not the EFI system partition.
    assert [(p.offset, p.fstype) for p in parts] == [(135168 * 512, "xfs")]
    assert scan_image(disk, "raw", INP) == []
    LEAKS["home directory"][0](clean)
    LEAKS["waagent provisioned marker"][0](clean)
    leaking = make_gpt_xfs_disk(tmp_path / "b", clean)
    before = leaking.read_bytes()
    found = [(f.kind, f.path) for f in scan_image(leaking, "raw", INP)]
    assert found == [("home", f"/home/{USER}"), ("waagent-state", "/var/lib/waagent/provisioned")], found
    assert leaking.read_bytes() == before  # read-only: not even the xfs log was replayed or written
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


# --- separate partitions, put together as the image's fstab says ------------------------------------------

HOME_UUID = "5e7a0000-1111-4222-8333-444455556666"


def _ext4_with(tmp: Path, name: str, tree: Path, mib: int, *, uuid: str = "", label: str = "") -> Path:
    part = tmp / name
    argv = ["mkfs.ext4", "-q", "-F", "-d", str(tree)]
    argv += (["-U", uuid] if uuid else []) + (["-L", label] if label else [])
    subprocess.run([*argv, str(part), f"{mib}M"], check=True, capture_output=True)
    return part


def make_split_disk(tmp: Path, parts: list[Path]) -> Path:
    """An MBR disk holding the given partition images back to back from 1 MiB, all type Linux."""
    disk = tmp / "split.raw"
    sizes = [p.stat().st_size // MIB for p in parts]
    with disk.open("wb") as fh:
        fh.truncate((1 + sum(sizes) + 1) * MIB)
    starts, at = [], 1
    for size in sizes:
        starts.append(at)
        at += size
    lines = [f"start={s * 2048}, size={z * 2048}, type=83\n" for s, z in zip(starts, sizes, strict=True)]
    layout = "label: dos\n" + "".join(lines)
    subprocess.run(["sfdisk", "-q", str(disk)], input=layout.encode(), check=True)
    for part, start in zip(parts, starts, strict=True):
        subprocess.run(["dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={start}", "conv=notrunc,sparse",
                        "status=none"], check=True)
        part.unlink()
    return disk


def test_separate_home_and_var_log_are_scanned_where_fstab_mounts_them(tmp_path: Path, clean: Path) -> None:
    """Hardened images split /home and /var/log off the root: a user's home or a log naming the user there is
    still found, and named by its path in the running system."""
    _w(clean, "/etc/fstab", "UUID=1234 / ext4 defaults 0 1\n"
       f"UUID={HOME_UUID.upper()} /home ext4 defaults,nodev 0 2\n"  # blkid prints lower case; fstab may not
       "# a comment, then swap and a bind mount that are not partitions\n/swapfile none swap sw 0 0\n"
       "/srv/x /mnt/x none bind 0 0\n"
       "LABEL=varlog /var/log ext4 defaults 0 2\n")
    home, varlog, stray = tmp_path / "home", tmp_path / "varlog", tmp_path / "stray"
    _w(home, f"/{USER}/.ssh/authorized_keys", "ssh-ed25519 AAAA k\n")
    _w(varlog, "/auth.log", f"sshd[1]: Accepted publickey for {USER} from x\n")
    _w(stray, "/etc/machine-id", "0123456789abcdef0123456789abcdef\n")  # in no fstab line: scanned on its own
    parts = [_ext4_with(tmp_path, "root.ext4", clean, 16),
             _ext4_with(tmp_path, "home.ext4", home, 8, uuid=HOME_UUID),
             _ext4_with(tmp_path, "varlog.ext4", varlog, 8, label="varlog"),
             _ext4_with(tmp_path, "stray.ext4", stray, 8)]
    disk = make_split_disk(tmp_path, parts)
    found = sorted((f.kind, f.path) for f in scan_image(disk, "raw", INP))
    assert found == [("home", f"/home/{USER}"), ("log-secret", "/var/log/auth.log"),
                     ("machine-id", "/etc/machine-id")], found
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


def test_fstab_mounts_order_and_what_is_left_out() -> None:
    fstab = ("# /etc/fstab\nUUID=a / xfs defaults 0 0\nUUID=b /var/log xfs defaults 0 0\n"
             "UUID=c /var xfs defaults 0 0\n/dev/sda2 none swap sw 0 0\nproc /proc proc defaults 0 0\n"
             "tmpfs /tmp tmpfs defaults 0 0\n/a /b none bind 0 0\nLABEL=x /data\\040dir ext4 defaults 0 2\n"
             "PARTUUID=d /boot/efi vfat umask=0077 0 1\nbroken-line\n")
    assert fstab_mounts(fstab) == [("UUID=c", "/var"), ("LABEL=x", "/data dir"), ("UUID=b", "/var/log"),
                                   ("PARTUUID=d", "/boot/efi")]
