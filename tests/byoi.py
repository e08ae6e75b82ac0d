"""Images not built by imagekit's base builder, for the bring-your-own-image tests (inspect, scan FILE).

One Debian root tree is made by a recipe of its own (``mmdebstrap --variant=minbase`` with the cloud kernel,
initramfs-tools' default ``MODULES=most``, GRUB's BIOS and EFI binaries, waagent and cloud-init as Debian
ships them, no imagekit customisation), cached under the test cache dir and shared by the test modules (a
lock keeps two workers from building it at once). Variants are copies of it, laid out differently from
the base images: GPT with an EFI system partition (vfat, ``EFI/BOOT/BOOTX64.EFI``) and an ext4 root, or
MBR with GRUB's boot code and an ext4 root, converted to qcow2, dynamic VHD or fixed VHD.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imagekit.base import apt
from imagekit.core.paths import REPO_ROOT, cache_dir

MIB = 1 << 20
SUITE = "bookworm"
PACKAGES = ("linux-image-cloud-amd64", "initramfs-tools", "systemd-sysv", "grub-pc-bin", "grub-efi-amd64-bin",
            "waagent", "cloud-init", "sudo", "openssh-server")
RECIPE = {"suite": SUITE, "variant": "minbase", "packages": PACKAGES, "recipe": 1}
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ROOT_UUID = "7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
ESP_ID = "1234ABCD"  # vfat volume id, as blkid prints it: 1234-ABCD
ROOT_MIB = 1280
ESP_MIB = 64


def _key() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def debian_tree() -> Path:
    """The cached mmdebstrap tree (built on first use, about a minute or two); treat it as read-only."""
    top = cache_dir() / "tests" / "byoi"
    tree = top / f"tree-{_key()}"
    with _locked(top / ".lock"):
        if (tree / ".complete").is_file():
            return tree
        tmp = top / f"building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        sources = apt.sources_for(SUITE, ("main",), apt.mirrors())
        subprocess.run(["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
                        "--mount-proc", "mmdebstrap", "--mode=root", "--format=directory", "--variant=minbase",
                        "--include=" + ",".join(PACKAGES), SUITE, str(tmp), *[s.line() for s in sources]],
                       check=True, capture_output=True, env={**os.environ, "TMPDIR": str(top)})
        (tmp / ".complete").write_text("")
        shutil.rmtree(tree, ignore_errors=True)
        tmp.rename(tree)
        return tree


def copy_tree(tree: Path, dest: Path) -> Path:
    """A private copy of the cached tree to change (host keys removed: every variant starts clean)."""
    subprocess.run(["cp", "-a", f"{tree}/.", str(dest)], check=True)
    (dest / ".complete").unlink(missing_ok=True)
    for key in (dest / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (dest / "etc/machine-id").write_text("")
    return dest


def kernel_version(root: Path) -> str:
    (name,) = [p.name for p in (root / "boot").glob("vmlinuz-*")]
    return name.removeprefix("vmlinuz-")


def write(root: Path, rel: str, text: str | bytes, mode: int = 0o644) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    p.chmod(mode)


def _grub_cfg(root: Path, cmdline: str) -> None:
    kver = kernel_version(root)
    write(root, "/boot/grub/grub.cfg", "set timeout=0\n"
          f"menuentry 'Debian' {{\n  search --no-floppy --fs-uuid --set=root {ROOT_UUID}\n"
          f"  linux /boot/vmlinuz-{kver} root=UUID={ROOT_UUID} ro {cmdline}\n"
          f"  initrd /boot/initrd.img-{kver}\n}}\n")


def _sparse(path: Path, mib: int) -> None:
    with path.open("wb") as fh:
        fh.truncate(mib * MIB)


def _ext4_into(disk: Path, root: Path, start_mib: int, mib: int) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", ROOT_UUID, "-L", "byoi-root", "-E",
                    f"offset={start_mib * MIB}", "-d", str(root), str(disk), f"{mib}M"], check=True,
                   capture_output=True, env={**os.environ, "MKE2FS_CONFIG": str(root / "etc/mke2fs.conf")})


def mtools() -> Path:
    """The mtools binaries from Debian's package, unpacked into the test cache (apt-get download, dpkg-deb -x;
    never installed on the host): they write files into a FAT image without mounting it."""
    top = cache_dir() / "tests" / "mtools"
    with _locked(top.parent / ".mtools.lock"):
        if not (top / "usr/bin/mcopy").is_file():
            dl = top.parent / f"mtools-dl-{os.getpid()}"
            shutil.rmtree(dl, ignore_errors=True)
            dl.mkdir(parents=True)
            subprocess.run(["apt-get", "download", "mtools"], cwd=dl, check=True, capture_output=True)
            (deb,) = dl.glob("mtools_*.deb")
            subprocess.run(["dpkg-deb", "-x", str(deb), str(top)], check=True)
            shutil.rmtree(dl)
    return top / "usr/bin"


def _vfat_with(tmp: Path, files: dict[str, bytes], mib: int) -> Path:
    """A FAT32 file system (mkfs.vfat) holding ``files`` (relative paths), written with mtools."""
    img = tmp / "esp.vfat"
    _sparse(img, mib)
    subprocess.run(["mkfs.vfat", "-F", "32", "-i", ESP_ID, "-n", "ESP", str(img)], check=True, capture_output=True)
    bin_ = mtools()
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    made: set[str] = set()
    for rel, data in files.items():
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                subprocess.run([str(bin_ / "mmd"), "-i", str(img), f"::/{d}"], check=True, capture_output=True,
                               env=env)
                made.add(d)
        src = tmp / "fat-file"
        src.write_bytes(data)
        subprocess.run([str(bin_ / "mcopy"), "-i", str(img), str(src), f"::/{rel}"], check=True, capture_output=True,
                       env=env)
        src.unlink()
    return img


def efi_grub(root: Path) -> bytes:
    """GRUB for x86_64 UEFI, made with the tree's own grub-mkimage (a real PE32+ binary)."""
    subprocess.run(["chroot", str(root), "grub-mkimage", "-O", "x86_64-efi", "-o", "/tmp/BOOTX64.EFI",
                    "-p", "/EFI/debian", "part_gpt", "fat", "ext2", "normal", "linux", "search",
                    "search_fs_uuid"], check=True, capture_output=True)
    data = (root / "tmp/BOOTX64.EFI").read_bytes()
    (root / "tmp/BOOTX64.EFI").unlink()
    return data


def gpt_uefi_disk(root: Path, out: Path, tmp: Path, cmdline: str = "console=tty1 console=ttyS0,115200n8") -> Path:
    """GPT: an EFI system partition (FAT32, EFI/BOOT/BOOTX64.EFI and a grub.cfg pointing at the root) at 1 MiB,
    then the ext4 root. No BIOS boot code."""
    _grub_cfg(root, cmdline)
    write(root, "/etc/fstab", f"UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n"
          f"UUID={ESP_ID[:4]}-{ESP_ID[4:]} /boot/efi vfat umask=0077 0 1\n")
    (root / "boot/efi").mkdir(exist_ok=True)
    stub = f"search.fs_uuid {ROOT_UUID} root\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n"
    esp = _vfat_with(tmp, {"EFI/BOOT/BOOTX64.EFI": efi_grub(root), "EFI/debian/grub.cfg": stub.encode()}, ESP_MIB)
    start = 1 + ESP_MIB
    _sparse(out, start + ROOT_MIB + 1)
    layout = (f"label: gpt\nstart=2048, size={ESP_MIB * 2048}, type={ESP_TYPE}, name=\"EFI\"\n"
              f"start={start * 2048}, size={ROOT_MIB * 2048}, type={LINUX_TYPE}, name=\"root\"\n")
    subprocess.run(["sfdisk", "-q", str(out)], input=layout.encode(), check=True)
    subprocess.run(["dd", f"if={esp}", f"of={out}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"],
                   check=True)
    esp.unlink()
    _ext4_into(out, root, start, ROOT_MIB)
    return out


ROOT_START_MIB = 2  # not the base images' 1 MiB


def mbr_bios_disk(root: Path, out: Path, cmdline: str = "console=ttyS0,115200 earlyprintk=ttyS0") -> Path:
    """MBR: the ext4 root at 2 MiB (active), a swap partition after it; GRUB's boot.img in the MBR and its core
    image (made with the tree's own grub-mkimage) in the gap before the root."""
    _grub_cfg(root, cmdline)
    write(root, "/etc/fstab", f"UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n/dev/sda2 none swap sw 0 0\n")
    write(root, "/tmp/early.cfg", f"search.fs_uuid {ROOT_UUID} root\nset prefix=($root)/boot/grub\n")
    subprocess.run(["chroot", str(root), "grub-mkimage", "-O", "i386-pc", "-o", "/tmp/core.img", "-c",
                    "/tmp/early.cfg", "-p", "/boot/grub", "biosdisk", "part_msdos", "ext2", "search_fs_uuid"],
                   check=True, capture_output=True)
    core = (root / "tmp/core.img").read_bytes()
    boot = (root / "usr/lib/grub/i386-pc/boot.img").read_bytes()
    for f in ("tmp/core.img", "tmp/early.cfg"):
        (root / f).unlink()
    _sparse(out, ROOT_START_MIB + ROOT_MIB + 16)
    layout = (f"label: dos\nstart={ROOT_START_MIB * 2048}, size={ROOT_MIB * 2048}, type=83, bootable\n"
              f"start={(ROOT_START_MIB + ROOT_MIB) * 2048}, size={16 * 2048}, type=82\n")
    subprocess.run(["sfdisk", "-q", str(out)], input=layout.encode(), check=True)
    _ext4_into(out, root, ROOT_START_MIB, ROOT_MIB)
    # GRUB's boot sector as grub-bios-setup writes it: the kernel sector (1) at 0x5c, the partition table kept.
    with out.open("r+b") as fh:
        mbr = bytearray(fh.read(512))
        mbr[:440] = boot[:440]
        mbr[0x5C:0x64] = (1).to_bytes(8, "little")
        fh.seek(0)
        fh.write(mbr)
        fh.seek(512)
        fh.write(core)
    return out


def convert(raw: Path, fmt: str, out: Path) -> Path:
    """qemu-img convert to qcow2, vpc (dynamic VHD), vpc-fixed (fixed VHD, exact size) or vmdk."""
    opts = {"vpc-fixed": ["-O", "vpc", "-o", "subformat=fixed,force_size=on"], "vpc": ["-O", "vpc"],
            "qcow2": ["-O", "qcow2"], "vmdk": ["-O", "vmdk"]}[fmt]
    subprocess.run(["qemu-img", "convert", "-f", "raw", *opts, str(raw), str(out)], check=True)
    return out


def debugfs(disk: Path, offset_mib: int, *commands: str, missing_ok: bool = False) -> None:
    """Change files in an ext4 root offline (``debugfs -w``), for a variant that differs in a few files."""
    script = disk.parent / f"{disk.name}.debugfs"
    script.write_text("\n".join(commands) + "\n")
    res = subprocess.run(["debugfs", "-w", "-f", str(script), f"{disk}?offset={offset_mib * MIB}"],
                         capture_output=True, text=True, check=True)
    script.unlink()
    errors = [ln for ln in res.stderr.splitlines() if not ln.startswith("debugfs ")
              and not (missing_ok and "File not found by ext2_lookup" in ln)]
    assert not errors, errors


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


DISKS_RECIPE = 1
GPT_ROOT_MIB = 1 + ESP_MIB  # where the GPT image's root starts
AZURE_DS = "datasource_list: [ Azure ]\n"


def base_disks() -> dict[str, Path]:
    """Two images of the tree, cached beside it (read them, or copy them to change): ``gpt`` (UEFI only,
    cloud-init provisions with the Azure datasource) and ``mbr`` (BIOS only, waagent provisions, cloud-init
    disabled). Built once per tree, under a lock."""
    tree = debian_tree()
    top = tree.parent / f"disks-{tree.name.removeprefix('tree-')}-{DISKS_RECIPE}"
    with _locked(tree.parent / ".disks.lock"):
        if not (top / ".complete").is_file():
            tmp = tree.parent / f"disks-building-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            root = copy_tree(tree, tmp / "root")
            write(root, "/etc/cloud/cloud.cfg.d/90_azure.cfg", AZURE_DS)
            gpt_uefi_disk(root, tmp / "gpt.raw", tmp)
            conf = (root / "etc/waagent.conf").read_text().replace("Provisioning.Agent=cloud-init",
                                                                   "Provisioning.Agent=waagent")
            write(root, "/etc/waagent.conf", conf)
            write(root, "/etc/cloud/cloud-init.disabled", "")
            mbr_bios_disk(root, tmp / "mbr.raw")
            shutil.rmtree(root)
            for f in ("gpt.raw", "mbr.raw"):
                (tmp / f).chmod(0o444)
            (tmp / ".complete").write_text("")
            shutil.rmtree(top, ignore_errors=True)
            tmp.rename(top)
    return {"gpt": top / "gpt.raw", "mbr": top / "mbr.raw"}


def sparse_copy(src: Path, dest: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
    dest.chmod(0o644)
    return dest


def put(disk: Path, offset_mib: int, files: dict[str, str | bytes], remove: tuple[str, ...] = (),
        mkdirs: tuple[str, ...] = ()) -> None:
    """Remove ``remove``, make ``mkdirs`` and write ``files`` (absolute paths) in the ext4 root."""
    if remove or mkdirs:
        debugfs(disk, offset_mib, *[f"rm {p}" for p in remove], *[f"mkdir {d}" for d in mkdirs])
    cmds = []
    staged = disk.parent / f"{disk.name}.files"
    staged.mkdir(exist_ok=True)
    for i, (path, data) in enumerate(files.items()):
        local = staged / str(i)
        local.write_bytes(data.encode() if isinstance(data, str) else data)
        local.chmod(0o644)
        parent, name = path.rsplit("/", 1)
        cmds += [f"cd {parent or '/'}", f"rm {name}", f"write {local} {name}"]
    if cmds:
        debugfs(disk, offset_mib, *cmds, missing_ok=True)
    shutil.rmtree(staged)


def gzip_bytes(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


INVOKE = REPO_ROOT / ".venv" / "bin" / "invoke"


def cli(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """An imagekit task run as a user runs it, with its own cache directory."""
    env = {**os.environ, "IMAGEKIT_CACHE": str(cache)}
    return subprocess.run([str(INVOKE), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=900, check=False)
