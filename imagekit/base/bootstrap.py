"""Build a bootable Azure-ready Debian disk from packages: mmdebstrap, configure, ext4 from the directory,
GRUB into the MBR gap, qcow2.

mmdebstrap runs in root mode inside private mount and PID namespaces (``unshare``): the /proc, /sys and
/dev mounts it makes in the chroot live only in that namespace and vanish with it, and no process of the
build outlives it, even when the build is killed. Every later step works on plain files (see
:mod:`imagekit.base.disk`), so no mount or loop device exists outside that namespace at any time.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import uuid
from pathlib import Path
from typing import Any

from imagekit.base import customize, disk
from imagekit.base.apt import AptSource
from imagekit.config.distros import Distro
from imagekit.core.errors import BuildError, CommandError
from imagekit.core.log import Timings, step
from imagekit.core.run import require, run

log = logging.getLogger(__name__)

ROOT_LABEL = "rootfs"
# Private mount and PID namespaces: mounts made inside vanish with the namespace, and when unshare is
# killed (subprocess.run does that on Ctrl-C) its child, the namespace's init, gets SIGKILL, which takes
# every process of the build (apt, dpkg, maintainer scripts) with it, so none keeps writing afterwards.
PRIVATE_NAMESPACES = ("unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
                      "--mount-proc")
HOST_COMMANDS = ("mmdebstrap", "unshare", "sfdisk", "mkfs.ext4", "e2fsck", "qemu-img", "systemctl", "chroot")


def package_set(distro: Distro) -> list[str]:
    return sorted(set(distro.source.packages) | set(distro.agent_packages))


def mmdebstrap_argv(distro: Distro, root: Path, sources: list[AptSource], stage: Path) -> list[str]:
    src = distro.source
    return [
        *PRIVATE_NAMESPACES,
        "mmdebstrap", "--mode=root", "--format=directory", f"--variant={src.variant}",
        f"--components={','.join(src.components)}",
        f"--include={','.join(package_set(distro))}",
        # Files needed before the first package is configured (the initramfs hook): copied in first.
        f"--setup-hook=cp -a {shlex.quote(str(stage))}/. \"$1\"/",
        "--aptopt=Acquire::Retries \"3\"",
        src.suite, str(root), *[s.line() for s in sources],
    ]


def _unfetchable_optional(exc: CommandError, sources: list[AptSource]) -> list[AptSource]:
    """The optional sources (-updates, -security) whose packages apt could not fetch (HTTP 404)."""
    text = exc.stderr + exc.stdout
    failed = re.findall(r"Failed to fetch (\S+)\s+404", text)
    broken = []
    for src in sources:
        if src.required:
            continue
        base = src.uri.rstrip("/") + "/"
        if any(url.startswith(base) for url in failed) and not any(
                s.uri == src.uri for s in sources if s.required):
            broken.append(src)
    return broken


def installed_packages(root: Path) -> dict[str, str]:
    out = run(["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W",
               "-f", "${db:Status-Abbrev}\t${Package}\t${Version}\n"]).stdout
    pkgs: dict[str, str] = {}
    for line in out.splitlines():
        status, name, version = line.split("\t")
        if status.startswith("ii"):
            pkgs[name] = version
    return pkgs


def build(distro: Distro, sources: list[AptSource], work: Path, out: Path, timings: Timings) -> dict[str, Any]:
    """Build ``out/image.qcow2`` for a bootstrap entry; return the facts for meta.json."""
    require(*HOST_COMMANDS)
    root = work / "root"
    stage = work / "stage"
    raw = work / "disk.raw"
    root_uuid = str(uuid.uuid4())

    customize.setup_hook_tree(stage)
    warnings: list[str] = []
    with step(f"Bootstrapping {distro.source.suite} with {len(package_set(distro))} packages (mmdebstrap)",
              timings):
        try:
            run(mmdebstrap_argv(distro, root, sources, stage), env={"TMPDIR": str(work)})
        except CommandError as exc:
            broken = _unfetchable_optional(exc, sources)
            if not broken:
                raise
            # Seen here: a mirror serving bullseye-security's index but not its pool (after the suite's
            # end of life). Build from the rest rather than not at all, and say so in the meta.
            msg = (f"the mirror lists {', '.join(s.suite for s in broken)} but does not serve its packages; "
                   "built without it")
            log.warning("%s", msg)
            warnings.append(msg)
            sources = [s for s in sources if s not in broken]
            shutil.rmtree(root, ignore_errors=True)
            run(mmdebstrap_argv(distro, root, sources, stage), env={"TMPDIR": str(work)})

    with step("Configuring the root file system", timings):
        kver = customize.kernel_version(root)
        initrd_modules = customize.verify_kernel_modules(root, kver)
        customize.configure_agent(root, distro)
        customize.configure_ssh(root, distro)
        customize.configure_network(root, distro)
        customize.configure_locale(root)
        customize.write_fstab(root, root_uuid)
        boot_img, core_img = customize.configure_grub(root, distro, root_uuid, kver)
        customize.enable_units(root)
        customize.scrub_identity(root)
        packages = installed_packages(root)
        customize.final_cleanup(root)
        missing = [p for p in package_set(distro) if p not in packages]
        if missing:
            raise BuildError(f"packages from the table are not installed: {', '.join(missing)}")
        boot_bytes, core_bytes = boot_img.read_bytes(), core_img.read_bytes()

    with step(f"Writing the disk ({distro.disk_size_mib} MiB, ext4 at sector "
              f"{disk.PARTITION_START_SECTOR}, GRUB for BIOS)", timings):
        disk.create_raw(raw, distro.disk_size_mib)
        (part,) = disk.partitions(raw)
        disk.make_ext4(raw, part, root, uuid=root_uuid, label=ROOT_LABEL,
                       mke2fs_conf=root / "etc/mke2fs.conf")
        (work / "boot.img").write_bytes(boot_bytes)
        (work / "core.img").write_bytes(core_bytes)
        disk.install_grub_bios(raw, work / "boot.img", work / "core.img")

    with step("Converting to qcow2", timings):
        image = out / "image.qcow2"
        disk.to_qcow2(raw, image)
        os.chmod(image, 0o444)

    return {
        "source": "bootstrap",
        "kernel": kver,
        "packages": packages,
        "root_uuid": root_uuid,
        "root_label": ROOT_LABEL,
        "partition_start_sector": part.start_sector,
        "disk_size_mib": distro.disk_size_mib,
        "kernel_cmdline": customize.kernel_cmdline(distro, root_uuid),
        "initramfs_modules": initrd_modules,
        "apt_sources": [s.line() for s in sources],
        "warnings": warnings,
    }
