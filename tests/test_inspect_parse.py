"""The parts of ``inspect`` that need no image: the parsers on literal text, the initramfs lister on hand-made
cpio archives, the FAT-free boot sector and PE checks, path resolution inside a tree, the distro match, and the
input checks that come before anything is read (fast lane; the images are in test_inspect.py)."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from imagekit.core.errors import InputError
from imagekit.inspect import parse, report, source
from imagekit.inspect.worker import resolve

# --- os-release, waagent.conf ------------------------------------------------------------------------------


def test_os_release_quoted_and_bare_values() -> None:
    text = ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\n'
            "ID=debian\n# a comment\nID_LIKE='rhel fedora'\nBROKEN LINE\nHOME_URL=\"https://www.debian.org/\"\n")
    assert parse.os_release(text) == {"PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)", "NAME": "Debian GNU/Linux",
                                      "VERSION_ID": "12", "ID": "debian", "ID_LIKE": "rhel fedora",
                                      "HOME_URL": "https://www.debian.org/"}


def test_waagent_conf_as_waagent_reads_it() -> None:
    text = ("# Provisioning.Agent=waagent\nProvisioning.Agent=auto\nProvisioning.Enabled=n # old style\n"
            'ResourceDisk.MountPoint="/mnt/resource"\n  # indented comment=still a key for waagent\n'
            "ResourceDisk.Format=y\nResourceDisk.Format=n\nno equals sign here\n")
    conf = parse.waagent_conf(text)
    assert conf["Provisioning.Agent"] == "auto"
    assert conf["Provisioning.Enabled"] == "n"
    assert conf["ResourceDisk.MountPoint"] == "/mnt/resource"
    assert conf["ResourceDisk.Format"] == "n"  # the later line wins
    assert "# Provisioning.Agent" not in conf


# --- cloud-init's datasource_list, checked against a YAML parser ------------------------------------------

CLOUD_CFGS = {
    "flow": "datasource_list: [ Azure ]\n",
    "flow with quotes": "datasource_list: [ 'NoCloud', \"ConfigDrive\", None ]\n",
    "flow over lines": "datasource_list: [ NoCloud, ConfigDrive,\n   Azure, None ]\nother: 1\n",
    "block": "# Written by a tool\ndatasource_list:\n  - Azure\n  # a comment in between\n  - None\nreporting: {}\n",
    "json": '{\n  "datasource_list": [\n    "Azure"\n  ]\n}\n',
    "json after a comment": "# Written by imagekit from the distro table.\n"
                            '{\n  "datasource_list": [\n    "Azure"\n  ]\n}\n',
    "yaml flow mapping": "{datasource_list: [ Azure, None ], datasource: {}}\n",
    "json without": '{"datasource": {"Azure": {"apply_network_config": false}}}',
    "none": "datasource:\n  Azure:\n    apply_network_config: false\n",
    "the last of two": "datasource_list: [ NoCloud ]\ndatasource_list: [ Azure ]\n",
}


@pytest.mark.parametrize("name", sorted(CLOUD_CFGS))
def test_datasource_list_reads_what_yaml_reads(name: str) -> None:
    text = CLOUD_CFGS[name]
    want = yaml.safe_load(text).get("datasource_list")
    assert parse.datasource_list(text) == ([str(x) for x in want] if want is not None else None)


def test_the_last_config_file_that_sets_the_list_wins() -> None:
    files = [("/etc/cloud/cloud.cfg", "datasource_list: [ NoCloud, Azure ]\n"),
             ("/etc/cloud/cloud.cfg.d/05_logging.cfg", "_log: []\n"),
             ("/etc/cloud/cloud.cfg.d/90_dpkg.cfg", "datasource_list: [ NoCloud, None ]\n"),
             ("/etc/cloud/cloud.cfg.d/99_other.cfg", "users: []\n")]
    assert parse.effective_datasource_list(files) == (["NoCloud", "None"], "/etc/cloud/cloud.cfg.d/90_dpkg.cfg")
    assert parse.effective_datasource_list(files[1:2]) == (None, "")


# --- kernel command lines ----------------------------------------------------------------------------------


def test_grub_cfg_linux_lines_in_order() -> None:
    cfg = ("menuentry 'Debian' {\n\tlinux\t/boot/vmlinuz-6.1 root=UUID=x ro console=tty1 console=ttyS0,115200n8\n}\n"
           "menuentry 'old' {\n  linuxefi /vmlinuz-5 root=/dev/sda1 quiet\n  linux16 /k\n}\n")
    assert parse.grub_cfg_cmdlines(cfg) == ["root=UUID=x ro console=tty1 console=ttyS0,115200n8",
                                            "root=/dev/sda1 quiet", ""]


def test_default_grub_with_grub_d_and_expansion() -> None:
    main = 'GRUB_CMDLINE_LINUX="console=tty1"\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
    ubuntu_cloud = ('GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT console=ttyS0 rootdelay=300"  '
                    "# cloud images\n")
    assert parse.default_grub_cmdline([main]) == "console=tty1 quiet"
    assert parse.default_grub_cmdline([main, ubuntu_cloud]) == "console=tty1 quiet console=ttyS0 rootdelay=300"


def test_bls_and_extlinux() -> None:
    assert parse.bls_options("title RHEL\nversion 5.14\nlinux /vmlinuz\noptions root=UUID=a ro console=ttyS0\n") \
        == "root=UUID=a ro console=ttyS0"
    assert parse.extlinux_appends("DEFAULT linux\nLABEL linux\n  KERNEL /vmlinuz\n  APPEND root=/dev/sda1 ro\n") \
        == ["root=/dev/sda1 ro"]


@pytest.mark.parametrize(("cmdline", "serial"), [
    ("root=x console=tty1 console=ttyS0,115200n8", True),
    ("console=ttyS0", True),
    ("console=ttyS1,115200 earlyprintk=ttyS0", False),  # earlyprintk is not a console; ttyS1 is not COM1
    ("console=tty1 quiet", False),
    ("", False),
])
def test_serial_console(cmdline: str, serial: bool) -> None:
    assert parse.has_serial_console(cmdline) is serial


# --- initramfs listing on hand-made cpio archives ----------------------------------------------------------


def newc(members: list[tuple[str, bytes]]) -> bytes:
    """A newc cpio archive (what initramfs-tools and dracut write), ending in TRAILER!!!"""
    out = bytearray()
    for i, (name, data) in enumerate([*members, ("TRAILER!!!", b"")]):
        mode = 0o100644 if name != "TRAILER!!!" else 0
        fields = [i + 1, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


KVER = "6.1.0-57-cloud-amd64"
MAIN = [(f"usr/lib/modules/{KVER}/kernel/drivers/hv/hv_vmbus.ko", b"\x7fELF vmbus"),
        (f"usr/lib/modules/{KVER}/kernel/drivers/scsi/hv_storvsc.ko.xz", b"xz module"),
        (f"usr/lib/modules/{KVER}/kernel/drivers/net/hyperv/hv_netvsc.ko.zst", b"zst module"),
        ("init", b"#!/bin/sh\n")]
EARLY = [("kernel", b""), ("kernel/x86", b""), ("kernel/x86/microcode/GenuineIntel.bin", b"\x01" * 1000)]


def test_cpio_names_of_debians_layout_early_plus_compressed_main() -> None:
    """initramfs-tools with microcode: an uncompressed early cpio, padding, then the compressed main cpio."""
    early = newc(EARLY)
    data = early + b"\0" * (-len(early) % 512) + gzip.compress(newc(MAIN))
    names = parse.cpio_names(data)
    assert names == [n for n, _ in EARLY] + [n for n, _ in MAIN]
    assert parse.module_names(names) == {"hv_vmbus", "hv_storvsc", "hv_netvsc"}


@pytest.mark.parametrize("compress", ["none", "gzip", "xz", "lzma", "zstd"])
def test_cpio_names_in_each_compression(compress: str) -> None:
    plain = newc(MAIN)
    if compress == "zstd" and shutil.which("zstd") is None:
        pytest.skip("zstd not installed")
    if compress == "gzip":
        data = gzip.compress(plain)
    elif compress == "xz":
        data = lzma.compress(plain)
    elif compress == "lzma":
        data = lzma.compress(plain, format=lzma.FORMAT_ALONE)
    elif compress == "zstd":
        data = subprocess.run(["zstd", "-q", "-c"], input=plain, capture_output=True, check=True).stdout
    else:
        data = plain
    assert parse.cpio_names(data) == [n for n, _ in MAIN]


def test_two_compressed_archives_back_to_back() -> None:
    data = gzip.compress(newc(MAIN[:1])) + gzip.compress(newc(MAIN[1:]))
    assert parse.cpio_names(data) == [n for n, _ in MAIN]


def test_initramfs_without_hyperv_drivers_lists_none() -> None:
    names = parse.cpio_names(gzip.compress(newc([("usr/lib/modules/x/kernel/drivers/scsi/sd_mod.ko", b"")])))
    assert parse.module_names(names) == {"sd_mod"}


def test_damaged_initramfs_is_an_error_not_a_guess() -> None:
    with pytest.raises(parse.InitramfsError, match="unknown data"):
        parse.cpio_names(b"this is no archive")
    with pytest.raises(parse.InitramfsError):
        parse.cpio_names(gzip.compress(newc(MAIN))[:200])
    with pytest.raises(parse.InitramfsError, match="truncated"):
        parse.cpio_names(newc(MAIN)[:150])


def test_module_names_from_modules_builtin() -> None:
    builtin = "kernel/drivers/hv/hv_vmbus.ko\nkernel/fs/ext4/ext4.ko\nkernel/drivers/net/hyperv/hv-netvsc.ko\n"
    assert parse.module_names(builtin.splitlines()) == {"hv_vmbus", "ext4", "hv_netvsc"}


# --- VHD footer, boot sector, PE header ----------------------------------------------------------------------


def vhd_footer(size: int, disk_type: int, *, good: bool = True) -> bytes:
    f = bytearray(512)
    f[0:8] = b"conectix"
    struct.pack_into(">IIQI", f, 8, 2, 0x00010000, 0xFFFFFFFFFFFFFFFF if disk_type == 2 else 512, 0)
    f[28:32] = b"qemu"
    struct.pack_into(">QQ", f, 40, size, size)
    struct.pack_into(">I", f, 60, disk_type)
    checksum = ~sum(f) & 0xFFFFFFFF
    struct.pack_into(">I", f, 64, checksum if good else checksum ^ 1)
    return bytes(f)


def test_vhd_footer() -> None:
    assert parse.vhd_footer(vhd_footer(30 << 30, 2)) == parse.VhdFooter("fixed", 30 << 30, True, "qemu")
    assert parse.vhd_footer(vhd_footer(1 << 20, 3)) == parse.VhdFooter("dynamic", 1 << 20, True, "qemu")
    assert parse.vhd_footer(vhd_footer(1 << 20, 2, good=False)).checksum_ok is False  # type: ignore[union-attr]
    assert parse.vhd_footer(b"\0" * 512) is None


def test_boot_sector() -> None:
    assert parse.boot_sector(b"\0" * 510 + b"\x55\xaa") == parse.BootSector(False, "", None)
    grub = bytearray(512)
    grub[0:2] = b"\xeb\x63"
    grub[0x5C:0x64] = (1).to_bytes(8, "little")
    grub[0x180:0x185] = b"GRUB "
    assert parse.boot_sector(bytes(grub)) == parse.BootSector(True, "GRUB", 1)
    other = b"\xfa\x31\xc0" + b"\x90" * 437 + b"\0" * 72
    assert parse.boot_sector(other) == parse.BootSector(True, "unknown", None)


def test_pe_machine() -> None:
    head = bytearray(1024)
    head[0:2] = b"MZ"
    struct.pack_into("<I", head, 0x3C, 0x80)
    head[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<H", head, 0x84, 0x8664)
    assert parse.pe_machine(bytes(head)) == "x86_64"
    struct.pack_into("<H", head, 0x84, 0xAA64)
    assert parse.pe_machine(bytes(head)) == "aarch64"
    assert parse.pe_machine(b"#!/bin/sh\n" + b"\0" * 100) is None


# --- paths inside an image tree ----------------------------------------------------------------------------


def test_links_resolve_inside_the_tree_never_on_the_host(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr/lib/os-release").write_text("ID=test\n")
    os.symlink("../usr/lib/os-release", root / "etc/os-release")
    os.symlink("usr/lib", root / "lib")
    os.symlink("/etc/passwd", root / "etc/abs")  # would be the host's file if followed from the host
    os.symlink("../../../../../../etc/shadow", root / "etc/up")
    os.symlink("loop", root / "etc/loop")
    assert resolve(root, "/etc/os-release") == root / "usr/lib/os-release"
    assert resolve(root, "lib/os-release") == root / "usr/lib/os-release"
    assert resolve(root, "/etc/abs") is None  # /etc/passwd inside the tree does not exist
    assert resolve(root, "/etc/up") is None
    assert resolve(root, "/etc/loop") is None
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    assert resolve(root, "/etc/abs") == root / "etc/passwd"


# --- which table entry -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("osr", "agent", "want"), [
    ({"ID": "debian", "VERSION_ID": "12"}, "waagent", ("debian-12", True)),
    ({"ID": "debian", "VERSION_ID": "12"}, "cloud-init", ("debian-12-cloudinit", True)),
    ({"ID": "debian", "VERSION_ID": "13"}, None, ("debian-13", False)),
    ({"ID": "ubuntu", "ID_LIKE": "debian", "VERSION_ID": "24.04"}, "cloud-init", ("ubuntu-24.04", True)),
    ({"ID": "almalinux", "ID_LIKE": "rhel centos fedora", "VERSION_ID": "9.4", "NAME": "AlmaLinux"}, "cloud-init",
     ("almalinux-9", True)),
    ({"ID": "rocky", "ID_LIKE": "rhel centos fedora", "VERSION_ID": "9.3", "NAME": "Rocky Linux"}, "cloud-init",
     ("rocky-9", True)),
    ({"ID": "gentoo", "VERSION_ID": "2.15"}, "cloud-init", (None, False)),
    ({"ID": "debian", "VERSION_ID": "99"}, "waagent", (None, False)),
])
def test_distro_match(osr: dict[str, str], agent: str | None, want: tuple[str | None, bool]) -> None:
    got = report._match(osr, agent)
    assert (got["id"], got["exact"]) == want, got


# --- input checks before anything is read ------------------------------------------------------------------


def test_bad_paths_are_one_line_errors(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    tiny = tmp_path / "tiny"
    tiny.write_text("hello\n")
    for path, what in ((tmp_path / "missing.qcow2", "no such file"), (tmp_path, "is a directory"),
                       (fifo, "is not a regular file"), (tiny, "less than one sector")):
        with pytest.raises(InputError) as exc:
            source.probe(path)
        msg = str(exc.value)
        assert "\n" not in msg and what in msg and str(path) in msg and "allowed: a disk image file" in msg


def test_a_text_file_is_not_a_disk_image(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n" * 400)
    before = text.read_bytes()
    with pytest.raises(InputError, match="not a disk image: qemu-img reads it as raw, but it holds no partition "
                                         "table and no file system"), source.open_disk(text, tmp_path / "work"):
        pass
    assert text.read_bytes() == before
    assert list((tmp_path / "work").iterdir()) == []  # its private directory is gone


def test_a_dead_runs_directory_is_removed_by_the_next_run(tmp_path: Path) -> None:
    work = tmp_path / "work"
    dead = work / "run-999999999-abc"
    dead.mkdir(parents=True)
    (dead / "disk.raw").write_bytes(b"x")
    text = tmp_path / "notes.txt"
    text.write_text("x" * 4096)
    with pytest.raises(InputError), source.open_disk(text, work):
        pass
    assert not dead.exists()


def test_no_linux_root_names_what_was_found_and_that_lvm_is_not_read(tmp_path: Path) -> None:
    info = source.ImageInfo(str(tmp_path / "rhel.qcow2"), "qcow2", "", 64 << 30, 1 << 30)
    disk = source.RawDisk(info, tmp_path / "disk.raw", 64 << 30, "raw", "gpt", [
        source.Part(1, 1 << 20, 200 << 20, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "vfat"),
        source.Part(2, 201 << 20, 1 << 30, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "xfs"),
        source.Part(3, 1225 << 20, 60 << 30, "E6D6D379-F507-44C2-A23C-238F2A3DF928", "LVM2_member")])
    with pytest.raises(InputError) as exc:
        report.require_linux_root(disk, {"root": None, "errors": {}})
    assert str(exc.value) == (
        f"{tmp_path}/rhel.qcow2: no Linux root file system found (found: vfat (partition 1), xfs (partition 2), "
        "LVM2_member (partition 3); LVM, LUKS and RAID members are not read: their file systems are not seen); "
        f"allowed: {source.ALLOWED} (a file system with /etc/os-release)")
    report.require_linux_root(disk, {"root": 2})  # a root found: no error
