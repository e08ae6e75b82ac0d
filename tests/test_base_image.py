"""Base images for real: build (or reuse from the cache) the Debian images, check them offline, boot them
under QEMU (TCG) to a login prompt, and prove that interruptions and a full disk leave nothing behind.

Every test here builds disks or boots VMs: marker ``vm``. The images go to the normal cache
(``imagekit.core.paths.cache_dir()``), so a second run reuses them; tests that must build from scratch use a
temp cache.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagekit.base import BaseImage, cache, customize, disk, ensure_base
from imagekit.base.inspect import open_image
from imagekit.config import distros
from imagekit.core.errors import BuildError
from imagekit.core.paths import REPO_ROOT

pytestmark = pytest.mark.vm

BOOTED = ("debian-11", "debian-12", "debian-12-cloudinit", "debian-13", "debian-13-cloudinit")
BOOT_DEADLINE_S = 600  # a hang fails the test; no assertion on speed
HYPERV_SMBIOS = "type=1,manufacturer=Microsoft Corporation,product=Virtual Machine,version=Hyper-V UEFI Release v4.1"


@pytest.fixture(scope="module", params=BOOTED)
def image(request: pytest.FixtureRequest) -> BaseImage:
    return ensure_base(distros.get(request.param))


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in any process's mount namespace."""
    found = []
    for mi in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            text = mi.read_text()
        except OSError:
            continue
        found += [line for line in text.splitlines() if str(path) in line.split()[4]]
    return found


# --- offline checks --------------------------------------------------------------------------------


def test_image_is_read_only_sparse_and_a_whole_number_of_mib(image: BaseImage) -> None:
    d = distros.get(image.distro_id)
    info = disk.qemu_img_info(image.path)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == d.disk_size_mib * disk.MIB
    assert os.stat(image.path).st_size < info["virtual-size"] // 10  # type: ignore[operator]
    assert not os.access(image.path, os.W_OK) or os.stat(image.path).st_mode & 0o222 == 0
    assert image.kernel and image.packages["openssh-server"]
    for p in (*d.source.packages, *d.agent_packages):
        assert p in image.packages, p


def test_image_contents_follow_the_table(image: BaseImage, tmp_path: Path) -> None:
    d = distros.get(image.distro_id)
    with open_image(image.path, tmp_path) as img:
        assert img.partition.start_sector == 2048 and len(img.partitions) == 1 and img.partition.bootable
        etc_ssh = img.listdir("/etc/ssh")
        assert not [n for n in etc_ssh if n.startswith("ssh_host_")], etc_ssh
        assert img.read_text("/etc/machine-id") == ""
        shadow = {f[0]: f[1] for f in (line.split(":") for line in img.read_text("/etc/shadow").splitlines())}
        assert shadow["root"] == "*"  # locked: no password login for root
        assert all(pw in ("*", "!", "!*", "") or pw.startswith("!") for pw in shadow.values()), shadow
        assert img.listdir("/home") == []
        assert ".bash_history" not in img.listdir("/root") and ".ssh" not in img.listdir("/root")
        conf = customize.read_waagent_conf(img.read_text("/etc/waagent.conf"))
        for k, v in d.waagent_conf.items():
            assert conf.get(k) == v, k
        grub = img.read_text("/boot/grub/grub.cfg")
        expected = customize.kernel_cmdline(d, image.root_uuid)
        assert f" {expected}\n" in grub and "rootdelay" not in grub
        assert "set timeout=1" in grub and "serial --unit=0" in grub
        assert f"UUID={image.root_uuid}\t/\text4" in img.read_text("/etc/fstab")
        sshd = img.read_text("/etc/ssh/sshd_config.d/50-azure.conf")
        assert f"ClientAliveInterval {d.ssh.client_alive_interval}" in sshd
        assert f"PermitRootLogin {d.ssh.permit_root_login}" in sshd
        assert img.exists(f"/etc/systemd/system/multi-user.target.wants/{customize.HOSTKEY_UNIT}")
        assert img.exists("/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service")
        assert img.read_text("/etc/resolv.conf") == "" and img.read_text("/etc/hostname") == "localhost\n"
        mods = img.read_text(f"/lib/modules/{image.kernel}/modules.dep")
        assert "/udf.ko" in mods and "/vfat.ko" in mods
        if d.agent is distros.Agent.CLOUD_INIT:
            ci = img.read_text("/etc/cloud/cloud.cfg.d/90_azure_datasource.cfg")
            assert '"datasource_list": [\n    "Azure"\n  ]' in ci
            assert not img.exists("/etc/network/interfaces.d/eth0")
        else:
            assert "iface eth0 inet dhcp" in img.read_text("/etc/network/interfaces.d/eth0")
        assert "eject" in image.packages
    assert not list(tmp_path.glob("imagekit-inspect-*"))


# --- boot ------------------------------------------------------------------------------------------


def _boot_to_login(base: Path, tmp: Path, also: tuple[str, ...] = ()) -> str:
    """Boot an overlay of ``base``; return the serial console once it shows a login prompt and every
    string in ``also`` (units that start after getty, such as the agent)."""
    overlay = tmp / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)],
                   check=True)
    serial = tmp / "serial.log"
    # hypervisor=off: with the TCG CPUID bit set, systemd-detect-virt says "qemu" and the agents'
    # ConditionVirtualization=microsoft fails; without it, the SMBIOS strings make it say "microsoft".
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max,hypervisor=off", "-m", "1024", "-smp", "1",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-smbios", HYPERV_SMBIOS,
        "-device", "virtio-scsi-pci,id=scsi",
        "-drive", f"file={overlay},if=none,id=os,format=qcow2,discard=unmap",
        "-device", "scsi-hd,drive=os,bus=scsi.0,lun=0",
        "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
        "-serial", f"file:{serial}",
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + BOOT_DEADLINE_S
        while time.monotonic() < deadline:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            if "login:" in text and all(a in text for a in also):
                return text
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                pytest.fail(f"QEMU exited {proc.returncode}: {err}\nserial tail:\n{text[-3000:]}")
            time.sleep(2)
        pytest.fail(f"no login prompt (and {also}) within {BOOT_DEADLINE_S} s; serial tail:\n{text[-3000:]}")
    finally:
        proc.kill()
        proc.wait()


def test_image_boots_through_grub_to_a_login_prompt(image: BaseImage, tmp_path: Path) -> None:
    d = distros.get(image.distro_id)
    console = _boot_to_login(image.path, tmp_path, also=("Azure Linux Agent",))
    assert "GNU GRUB" in console
    cmdline = next(line for line in console.splitlines() if "Command line:" in line)
    for arg in d.kernel_cmdline:
        assert arg in cmdline.split()
    assert "rootdelay" not in cmdline
    assert "Detected virtualization microsoft" in console or "Hyper-V" in console
    # The agent unit's ConditionVirtualization held, so the image will run the agent on Azure.
    assert "Azure Linux Agent" in console
    assert "Generate SSH host keys" in console or "ssh-host-keys-generate" in console
    assert f"{'Debian GNU/Linux'}" in console and "login:" in console


# --- cache -----------------------------------------------------------------------------------------


def test_unchanged_inputs_come_from_the_cache_untouched() -> None:
    first = ensure_base(distros.get("debian-12"))
    mtime = first.path.stat().st_mtime_ns
    again = ensure_base(distros.get("debian-12"))
    assert again.cached and again.path == first.path and again.key == first.key
    assert again.path.stat().st_mtime_ns == mtime


def test_a_changed_input_builds_a_new_entry(tmp_path: Path) -> None:
    d = distros.get("debian-12")
    small = dataclasses.replace(d, disk_size_mib=3072)
    built = ensure_base(small, cache=tmp_path)
    assert not built.cached
    assert built.key != ensure_base(d).key
    assert disk.qemu_img_info(built.path)["virtual-size"] == 3072 * disk.MIB
    assert ensure_base(small, cache=tmp_path).cached
    assert [p.name for p in (tmp_path / "base" / d.id).iterdir() if p.name.startswith(".build")] == []


# --- interruptions and a full disk ------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the cache needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_too_small_a_cache_disk_is_refused_up_front(tmpfs: Path) -> None:
    with pytest.raises(BuildError, match="not enough free space"):
        ensure_base(distros.get("debian-12"), cache=tmpfs)
    assert cache.entries(tmpfs / "base", "debian-12") == []


def test_a_disk_that_fills_up_mid_build_leaves_no_entry_and_nothing_mounted(tmpfs: Path) -> None:
    with pytest.raises(BuildError) as exc:
        ensure_base(distros.get("debian-12"), cache=tmpfs, min_free_mib=0)
    assert "no space left" in str(exc.value)
    ddir = tmpfs / "base" / "debian-12"
    assert cache.entries(tmpfs / "base", "debian-12") == []
    assert [p.name for p in ddir.iterdir() if p.name != ".lock"] == []
    assert _mounts_under(tmpfs / "base") == []


def test_ctrl_c_during_the_bootstrap_leaves_nothing_behind(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from imagekit.base import ensure_base; "
            "from imagekit.config import distros; ensure_base(distros.get('debian-13'), cache=Path(sys.argv[1]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ddir = tmp_path / "base" / "debian-13"
    try:
        deadline = time.monotonic() + 300
        # Wait until mmdebstrap has mounted /proc etc. in the chroot (inside its own mount namespace).
        while time.monotonic() < deadline and not _mounts_under(tmp_path):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.5)
        assert list(ddir.glob(".build-*/work/root"))
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in stderr
    time.sleep(1)
    assert _mounts_under(tmp_path) == []
    assert [p.name for p in ddir.iterdir() if p.name != ".lock"] == []
