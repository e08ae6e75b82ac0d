"""``inspect FILE`` on images imagekit's base builder did not make (:mod:`tests.byoi`: mmdebstrap with Debian's own
package defaults, GPT with an EFI system partition or MBR with GRUB in the gap before a root at 2 MiB), in raw,
qcow2, dynamic VHD, fixed VHD and VMDK, plus variants that would fail on Azure, and bad input. Every run is the
real CLI as a user types it; every input's SHA-256 is the same afterwards.

Marker ``vm``: these tests build disk images (the parsers are tested in the fast lane, test_inspect_parse.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imagekit.core.run import which
from tests import byoi

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0 or which("mmdebstrap") is None or which("debugfs") is None,
                       reason="needs root (loop mounts), mmdebstrap and debugfs"),
]
INVOKE = byoi.INVOKE
MIB = 1 << 20
GPT_MIB = 1 + 64 + 1280 + 1  # the GPT image: 1 MiB, the ESP, the root, 1 MiB for the backup GPT
MBR_MIB = 2 + 1280 + 16


cli = byoi.cli


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two cached layouts, their conversions, and variants changed in a few files (debugfs on copies)."""
    base = byoi.base_disks()
    d = tmp_path_factory.mktemp("byoi-inspect")
    kver = byoi.kernel_version(byoi.debian_tree())
    out = {"gpt-raw": base["gpt"], "mbr-raw": base["mbr"],
           "gpt-qcow2": byoi.convert(base["gpt"], "qcow2", d / "gpt.qcow2"),
           "gpt-vhd-dynamic": byoi.convert(base["gpt"], "vpc", d / "gpt-dynamic.vhd"),
           "gpt-vhd-fixed": byoi.convert(base["gpt"], "vpc-fixed", d / "gpt-fixed.vhd"),
           "mbr-vmdk": byoi.convert(base["mbr"], "vmdk", d / "mbr.vmdk")}
    # cloud-init provisions, but its datasource list (as a NoCloud image has it) lacks Azure
    noazure = byoi.sparse_copy(base["gpt"], d / "cloudinit-no-azure.raw")
    byoi.put(noazure, byoi.GPT_ROOT_MIB, {"/etc/cloud/cloud.cfg.d/90_dpkg.cfg": "datasource_list: [ NoCloud, None ]\n"},
             remove=("/etc/cloud/cloud.cfg.d/90_azure.cfg",))
    out["cloudinit-no-azure"] = noazure
    # no agent at all
    noagent = byoi.sparse_copy(base["mbr"], d / "no-agent.raw")
    byoi.put(noagent, byoi.ROOT_START_MIB, {},
             remove=("/usr/sbin/waagent", "/usr/bin/cloud-init", "/etc/waagent.conf"))
    out["no-agent"] = noagent
    # waagent's unit disabled, no serial console, an initramfs without the Hyper-V drivers
    from tests.test_inspect_parse import newc

    broken = byoi.sparse_copy(base["mbr"], d / "broken.raw")
    initrd = byoi.gzip_bytes(newc([("init", b"#!/bin/sh\n"),
                                   (f"usr/lib/modules/{kver}/kernel/drivers/scsi/sd_mod.ko", b"")]))
    grub = (f"menuentry 'Debian' {{\n  linux /boot/vmlinuz-{kver} root=UUID={byoi.ROOT_UUID} ro quiet\n"
            f"  initrd /boot/initrd.img-{kver}\n}}\n")
    byoi.put(broken, byoi.ROOT_START_MIB, {"/boot/grub/grub.cfg": grub, f"/boot/initrd.img-{kver}": initrd},
             remove=("/etc/systemd/system/multi-user.target.wants/walinuxagent.service",))
    out["broken"] = broken
    return out


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def inspect_json(cache: Path, image: Path) -> dict[str, Any]:
    before = byoi.sha256(image)
    res = cli(cache, "inspect", "--json", str(image))
    assert res.returncode == 0, res.stderr
    assert byoi.sha256(image) == before  # the file is never written
    assert not list((cache / "inspect").glob("run-*"))  # its temp copy and mount points are gone
    assert str(image) not in Path("/proc/self/mountinfo").read_text()
    data: dict[str, Any] = json.loads(res.stdout)
    return data


GPT_PARTITIONS = [
    {"number": 1, "offset": 1 * MIB, "size": 64 * MIB, "type_name": "EFI System", "fstype": "vfat", "label": "ESP",
     "mounted_at": "/boot/efi"},  # by the fstab's UUID=1234-ABCD (read, not mounted: FAT is read in user space)
    {"number": 2, "offset": 65 * MIB, "size": 1280 * MIB, "type_name": "Linux filesystem", "fstype": "ext4",
     "label": "byoi-root", "mounted_at": "/"},
]


@pytest.mark.parametrize(("name", "fmt", "subformat", "virtual", "ready"), [
    ("gpt-raw", "raw", "", GPT_MIB * MIB, False),
    ("gpt-qcow2", "qcow2", "", GPT_MIB * MIB, False),
    # qemu-img sizes a dynamic VHD by its CHS geometry: not a whole number of MiB
    ("gpt-vhd-dynamic", "vpc", "dynamic", 1411522560, False),
    ("gpt-vhd-fixed", "vpc", "fixed", GPT_MIB * MIB, True),
])
def test_gpt_uefi_cloud_init_image_in_each_format(images: dict[str, Path], cache: Path, name: str, fmt: str,
                                                  subformat: str, virtual: int, ready: bool) -> None:
    r = inspect_json(cache, images[name])
    img = r["image"]
    assert (img["format"], img["subformat"], img["virtual_size"], img["azure_ready"]) == (fmt, subformat, virtual,
                                                                                          ready)
    assert r["partition_table"] == "gpt"
    keys = ("number", "offset", "size", "type_name", "fstype", "label", "mounted_at")
    assert [{k: p[k] for k in keys} for p in r["partitions"]] == GPT_PARTITIONS
    assert r["boot"]["modes"] == ["uefi"] and r["boot"]["azure_generations"] == [2]
    assert r["boot"]["uefi"]["loaders"] == ["/EFI/BOOT/BOOTX64.EFI"]
    assert r["boot"]["bios"]["detail"] == "no boot code in the MBR"
    assert r["os"]["ID"] == "debian" and r["os"]["VERSION_ID"] == "12"
    assert r["os"]["PRETTY_NAME"] == "Debian GNU/Linux 12 (bookworm)"
    a = r["agents"]
    assert a["provisioning"] == "cloud-init"
    assert a["cloud_init"]["datasource_list"] == ["Azure"]
    assert a["cloud_init"]["datasource_list_from"] == "/etc/cloud/cloud.cfg.d/90_azure.cfg"
    assert sorted(a["cloud_init"]["enabled"]) == ["cloud-config.service", "cloud-final.service",
                                                  "cloud-init-local.service", "cloud-init.service"]
    assert a["waagent"]["settings"]["Provisioning.Agent"] == "cloud-init"  # Debian's package default
    assert a["waagent"]["enabled"] == {"walinuxagent.service": ["/etc/systemd/system/multi-user.target.wants"]}
    (k,) = r["kernels"]
    assert k["version"].endswith("-cloud-amd64") and k["initramfs"] == f"/boot/initrd.img-{k['version']}"
    # initramfs-tools' MODULES=most puts the Hyper-V drivers in (the early microcode cpio is read past)
    assert k["hyperv_drivers"] == {"hv_vmbus": "in the initramfs", "hv_storvsc": "in the initramfs",
                                   "hv_netvsc": "in the initramfs"}
    assert r["kernel_cmdline"]["source"] == "/boot/grub/grub.cfg"
    assert r["kernel_cmdline"]["serial_console"] is True and r["kernel_cmdline"]["rootdelay"] is None
    assert r["distro"] == {"id": "debian-12-cloudinit", "exact": True,
                           "why": "family debian, version 12, agent cloud-init"}
    assert r["problems"] == []
    not_fixed = [n for n in r["notes"] if n.startswith("not a file Azure takes as it is")]
    assert bool(not_fixed) is not ready


def test_mbr_bios_waagent_image_readable_summary(images: dict[str, Path], cache: Path) -> None:
    image = images["mbr-raw"]
    before = byoi.sha256(image)
    res = cli(cache, "inspect", str(image))
    assert res.returncode == 0, res.stderr
    assert byoi.sha256(image) == before
    out = res.stdout
    assert f"format     raw, virtual {MBR_MIB} MiB; Azure takes it as is: no (build converts it)" in out
    assert "partitions DOS\n" in out
    assert "   1       2 MiB +  1280 MiB  Linux              ext4 label 'byoi-root' mounted at /\n" in out
    assert "   2    1282 MiB +    16 MiB  Linux swap         -\n" in out
    assert "boot       BIOS (Azure generation 1)\n" in out
    assert "  BIOS: GRUB boot code in the MBR, its core image at sector 1 in the gap before the first partition" in out
    assert "  UEFI: no EFI system partition" in out
    assert "agents     provisioning by waagent\n" in out
    assert "Provisioning.Agent=waagent" in out and "enabled: walinuxagent.service in multi-user.target.wants" in out
    # cloud-init is installed but disabled (/etc/cloud/cloud-init.disabled): no note that it would act too
    assert ("cloud-init: /usr/bin/cloud-init; datasource_list ['Azure'] from /etc/cloud/cloud.cfg.d/90_azure.cfg; "
            "enabled: cloud-init-local.service, cloud-init.service, cloud-config.service, cloud-final.service in "
            "cloud-init.target.wants; disabled\n") in out
    assert "they may both act" not in out
    assert "  from /boot/grub/grub.cfg; serial console: yes; no rootdelay" in out
    assert "distro     debian-12: family debian, version 12, agent waagent\n" in out
    assert "problems   none found\n" in out


def test_vmdk_is_read_too(images: dict[str, Path], cache: Path) -> None:
    r = inspect_json(cache, images["mbr-vmdk"])
    assert r["image"]["format"] == "vmdk" and r["boot"]["modes"] == ["bios"]
    assert r["distro"]["id"] == "debian-12" and r["problems"] == []


def test_cloud_init_without_the_azure_datasource(images: dict[str, Path], cache: Path) -> None:
    r = inspect_json(cache, images["cloudinit-no-azure"])
    assert r["agents"]["cloud_init"]["datasource_list"] == ["NoCloud", "None"]
    assert r["problems"] == [
        "cloud-init's datasource_list (/etc/cloud/cloud.cfg.d/90_dpkg.cfg) is ['NoCloud', 'None'], without Azure: "
        "cloud-init will not read the provisioning data"]


def test_no_agent_installed(images: dict[str, Path], cache: Path) -> None:
    r = inspect_json(cache, images["no-agent"])
    assert r["agents"]["provisioning"] is None
    assert not r["agents"]["waagent"]["installed"] and not r["agents"]["cloud_init"]["installed"]
    assert r["problems"] == ["no provisioning agent installed (neither waagent nor cloud-init): the VM never "
                             "reports Ready and Azure's provisioning times out"]
    assert r["distro"]["id"] == "debian-12" and r["distro"]["exact"] is False


def test_disabled_unit_no_serial_console_no_hyperv_drivers(images: dict[str, Path], cache: Path) -> None:
    r = inspect_json(cache, images["broken"])
    (k,) = r["kernels"]
    assert k["hyperv_drivers"] == {"hv_vmbus": "missing", "hv_storvsc": "missing", "hv_netvsc": "missing"}
    problems = r["problems"]
    assert len(problems) == 3, problems
    assert problems[0] == ("waagent's unit walinuxagent.service is not enabled (no link in a systemd .wants "
                           "directory): it provisions this image")
    assert problems[1].startswith(f"kernel {k['version']}: hv_vmbus, hv_storvsc, hv_netvsc neither built in nor in "
                                  f"its initramfs /boot/initrd.img-{k['version']}")
    assert problems[2] == ("no serial console on the kernel command line (/boot/grub/grub.cfg): console=ttyS0 is "
                           "missing, so Azure's boot diagnostics and serial console show nothing")


# --- bad input -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    text = d / "notes.txt"
    text.write_text("this is not a disk image\n" * 1000)
    dyn = images["gpt-vhd-dynamic"].read_bytes()
    (d / "truncated-dynamic.vhd").write_bytes(dyn[:len(dyn) // 3])
    with images["gpt-vhd-fixed"].open("rb") as src, (d / "truncated-fixed.vhd").open("wb") as dst:
        dst.write(src.read(400 * MIB))
    # a disk with a FAT and an ext4 data partition: no file system holds an OS
    noroot = d / "no-root.raw"
    with noroot.open("wb") as fh:
        fh.truncate(64 * MIB)
    subprocess.run(["sfdisk", "-q", str(noroot)], input=b"label: dos\nstart=2048, size=30720, type=c\n"
                   b"start=32768, type=83\n", check=True)
    data = d / "data"
    byoi.write(data, "/srv/readme.txt", "data only\n")
    subprocess.run(["mkfs.vfat", "--offset", "2048", str(noroot), str(15 * 1024)], check=True, capture_output=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={16 * MIB}", "-d", str(data), str(noroot), "47M"],
                   check=True, capture_output=True)
    return {"text": text, "truncated-dynamic": d / "truncated-dynamic.vhd",
            "truncated-fixed": d / "truncated-fixed.vhd", "no-root": noroot, "directory": d,
            "missing": d / "missing.qcow2"}


BAD = {
    "text": "not a disk image: qemu-img reads it as raw, but it holds no partition table and no file system",
    "truncated-dynamic": "not readable as a disk image: qemu-img says: Could not open",
    "truncated-fixed": f"truncated: its GPT says the disk has {GPT_MIB * MIB} bytes, but the disk data ends at byte "
                       f"{400 * MIB}",
    "no-root": "no Linux root file system found (found: vfat (partition 1), ext4 (partition 2))",
    "directory": "is a directory, not a disk image file",
    "missing": "no such file",
}


@pytest.mark.parametrize("task", ["inspect", "scan"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line_and_the_file_is_untouched(bad_inputs: dict[str, Path], cache: Path, task: str,
                                                                case: str) -> None:
    path = bad_inputs[case]
    before = byoi.sha256(path) if path.is_file() else None
    res = cli(cache, task, str(path))
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"imagekit: error: {path}: {BAD[case]}"), lines[0]
    assert "allowed: a disk image file qemu-img reads" in lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    if before is not None:
        assert byoi.sha256(path) == before
    assert not list((cache / "inspect").glob("run-*"))


@pytest.mark.parametrize("distro_id", ["debian-12", "debian-12-cloudinit"])
def test_imagekits_own_base_image_matches_its_entry_with_no_problems(cache: Path, distro_id: str) -> None:
    """The base builder's images provision on the emulated platform (test_provision_vm): inspect must find
    nothing wrong with them and name their own entry."""
    from imagekit.base import ensure_base
    from imagekit.config import distros

    d = distros.get(distro_id)
    img = ensure_base(d)  # cached by the base image tests
    r = inspect_json(cache, img.path)
    assert r["distro"] == {"id": distro_id, "exact": True,
                           "why": f"family debian, version 12, agent {d.agent.value}"}
    assert r["problems"] == []
    assert r["boot"]["modes"] == ["bios"] and r["partition_table"] == "dos"
    assert r["kernels"][0]["version"] == img.kernel and r["kernels"][0]["hyperv_ok"] is True
    assert r["kernel_cmdline"]["cmdline"].endswith(" ".join(d.kernel_cmdline))
    if d.agent is distros.Agent.CLOUD_INIT:
        assert r["agents"]["cloud_init"]["datasource_list"] == ["Azure"]
        assert r["agents"]["cloud_init"]["datasource_list_from"] == "/etc/cloud/cloud.cfg.d/90_azure_datasource.cfg"
    else:
        assert r["agents"]["waagent"]["settings"]["Provisioning.Agent"] == "waagent"


def test_rhel_family_layout_xfs_root_bls_entry_dracut_initramfs(tmp_path: Path, cache: Path) -> None:
    """A RHEL-family layout (GPT with BIOS boot and EFI system partitions, xfs root, a BLS entry for the
    command line, dracut's initramfs name with xz modules, the waagent.service unit, Provisioning.Agent=auto),
    built from a hand-made tree: family, version and agent find almalinux-9. Its empty EFI system partition
    and MBR without boot code leave it no boot mode."""
    from tests.test_inspect_parse import EARLY, newc
    from tests.test_leakscan import make_gpt_xfs_disk

    kver = "5.14.0-427.13.1.el9_4.x86_64"
    root = tmp_path / "root"
    w = byoi.write
    w(root, "/etc/os-release", 'NAME="AlmaLinux"\nVERSION="9.4 (Seafoam Ocelot)"\nID="almalinux"\n'
      'ID_LIKE="rhel centos fedora"\nVERSION_ID="9.4"\nPRETTY_NAME="AlmaLinux 9.4 (Seafoam Ocelot)"\n')
    w(root, "/etc/fstab", "UUID=1234 / xfs defaults 0 0\n")
    w(root, "/usr/sbin/waagent", "#!/usr/bin/python3\n", 0o755)
    w(root, "/etc/waagent.conf", "Provisioning.Agent=auto\nResourceDisk.Format=n\nResourceDisk.EnableSwap=n\n")
    w(root, "/usr/bin/cloud-init", "#!/usr/bin/python3\n", 0o755)
    w(root, "/etc/cloud/cloud.cfg", "datasource_list: [ NoCloud, None ]\n")
    w(root, "/etc/cloud/cloud.cfg.d/91-azure_datasource.cfg", "datasource_list: [ Azure ]\n")
    for unit, target in (("waagent.service", "multi-user.target"), ("cloud-init.service", "cloud-init.target"),
                         ("cloud-final.service", "cloud-init.target")):
        w(root, f"/usr/lib/systemd/system/{unit}", "[Unit]\n")
        (root / f"etc/systemd/system/{target}.wants").mkdir(parents=True, exist_ok=True)
        os.symlink(f"/usr/lib/systemd/system/{unit}", root / f"etc/systemd/system/{target}.wants/{unit}")
    mods = f"usr/lib/modules/{kver}/kernel/drivers"
    import lzma

    main = newc([(f"{mods}/hv/hv_vmbus.ko.xz", b""), (f"{mods}/scsi/hv_storvsc.ko.xz", b""),
                 (f"{mods}/net/hyperv/hv_netvsc.ko.xz", b"")])
    w(root, f"/boot/initramfs-{kver}.img", newc(EARLY) + lzma.compress(main))
    w(root, f"/boot/vmlinuz-{kver}", b"MZ kernel")
    w(root, f"/boot/loader/entries/4b7ae7b1-{kver}.conf", f"title AlmaLinux ({kver}) 9.4\nversion {kver}\n"
      f"linux /vmlinuz-{kver}\noptions root=UUID=1234 ro console=tty1 console=ttyS0,115200n8 earlyprintk=ttyS0 "
      "rootdelay=300\n")
    (tmp_path / "disk").mkdir()
    image = make_gpt_xfs_disk(tmp_path / "disk", root)
    r = inspect_json(cache, image)
    assert [(p["number"], p["type_name"], p["fstype"], p["mounted_at"]) for p in r["partitions"]] == [
        (1, "BIOS boot", "", ""), (2, "EFI System", "vfat", ""), (3, "Linux filesystem", "xfs", "/")]
    assert r["os"]["ID"] == "almalinux" and r["os"]["VERSION_ID"] == "9.4"
    assert r["agents"]["provisioning"] == "cloud-init"  # auto, with cloud-init installed
    assert r["agents"]["cloud_init"]["datasource_list"] == ["Azure"]
    assert r["agents"]["waagent"]["enabled"] == {"waagent.service": ["/etc/systemd/system/multi-user.target.wants"]}
    assert r["kernels"] == [{"version": kver, "kernel": f"/boot/vmlinuz-{kver}",
                             "initramfs": f"/boot/initramfs-{kver}.img",
                             "hyperv_drivers": {"hv_vmbus": "in the initramfs", "hv_storvsc": "in the initramfs",
                                                "hv_netvsc": "in the initramfs"},
                             "hyperv_ok": True, "initramfs_error": ""}]
    cl = r["kernel_cmdline"]
    assert cl["source"] == f"/boot/loader/entries/4b7ae7b1-{kver}.conf" and cl["rootdelay"] == "300"
    assert cl["serial_console"] is True
    assert r["distro"] == {"id": "almalinux-9", "exact": True, "why": "family rhel, version 9, agent cloud-init"}
    assert r["problems"] == ["no boot mode: no boot code in the MBR; EFI system partition 2 (vfat) without an "
                             "x86_64 boot loader"]
