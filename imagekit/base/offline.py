"""Configure the agent inside a downloaded image, offline, from the distro table.

:func:`imagekit.base.download.configure_offline` runs this module as ``unshare --mount --propagation private python -m
imagekit.base.offline`` with a JSON request on stdin. Inside that private mount namespace the image's
root partition is loop-mounted at its offset (``mount -o loop`` sets autoclear, so the loop device goes
away with the mount) and, when packages must be installed, /proc, /sys and /dev are bind-mounted for
the chroot. Nothing is visible outside the namespace, and when the process ends for any reason the
namespace, its mounts and the loop device go with it.

What it does, by family: Debian and Ubuntu (dpkg/apt) images get missing agent packages installed with
the image's own apt (this needs the image's archive to be reachable; otherwise a clear error), then
waagent.conf, cloud-init's datasource list and sshd's settings from the table. Other families are
configured when their agent packages are already installed (rpm database checked), and refused with a
clear error otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imagekit.base import customize
from imagekit.config.distros import Distro, Family
from imagekit.core.errors import BuildError, ImagekitError
from imagekit.core.run import run

APT_FAMILIES = (Family.DEBIAN, Family.UBUNTU)


def _dpkg_packages(root: Path) -> dict[str, str]:
    status = root / "var/lib/dpkg/status"
    pkgs: dict[str, str] = {}
    if not status.exists():
        return pkgs
    for stanza in status.read_text(errors="replace").split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith(" "):
                k, _, v = line.partition(":")
                fields[k] = v.strip()
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            pkgs[fields["Package"]] = fields.get("Version", "")
    return pkgs


def _rpm_packages(root: Path) -> dict[str, str]:
    res = run(["rpm", f"--root={root}", "-qa", "--qf", "%{NAME}\t%{VERSION}-%{RELEASE}\n"], check=False)
    return dict(line.split("\t", 1) for line in res.stdout.splitlines() if "\t" in line)


# Without rpm on the host, an agent package is recognised by its main program in the image.
AGENT_PROGRAMS = {"WALinuxAgent": "usr/sbin/waagent", "walinuxagent": "usr/sbin/waagent",
                  "waagent": "usr/sbin/waagent", "python-azure-agent": "usr/sbin/waagent",
                  "cloud-init": "usr/bin/cloud-init"}


def _packages(root: Path, family: Family) -> dict[str, str]:
    if family in APT_FAMILIES:
        return _dpkg_packages(root)
    try:
        return _rpm_packages(root)
    except ImagekitError:
        return {name: "unknown (no rpm on the host)" for name, prog in AGENT_PROGRAMS.items()
                if (root / prog).exists()}


def _apt_install(root: Path, packages: list[str]) -> None:
    """Install with the image's own apt in a chroot (mounts are private to this namespace)."""
    for sub in ("proc", "sys", "dev"):
        run(["mount", "--rbind", f"/{sub}", str(root / sub)])
    resolv = root / "etc/resolv.conf"
    saved = root / "etc/.resolv.conf.imagekit-saved"
    had = resolv.exists() or resolv.is_symlink()
    if had:
        os.rename(resolv, saved)
    try:
        shutil.copy("/etc/resolv.conf", resolv)
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        for argv in (["apt-get", "update"],
                     ["apt-get", "install", "-y", "--no-install-recommends", *packages],
                     ["apt-get", "clean"]):
            res = run(["chroot", str(root), *argv], env=env, check=False, timeout=1800)
            if res.returncode != 0:
                tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-8:])
                raise BuildError(
                    f"cannot install {', '.join(packages)} into the image: `{' '.join(argv)}` failed "
                    f"(the image's package archive must be reachable from this machine):\n{tail}")
        for lists in (root / "var/lib/apt/lists").glob("*_*"):
            lists.unlink()
    finally:
        resolv.unlink(missing_ok=True)
        if had:
            os.rename(saved, resolv)


def _configure(root: Path, distro: Distro) -> dict[str, Any]:
    pkgs = _packages(root, distro.family)
    missing = [p for p in distro.agent_packages if p not in pkgs]
    installed_now: list[str] = []
    if missing:
        if distro.family not in APT_FAMILIES:
            raise BuildError(
                f"the image lacks {', '.join(missing)}; installing packages offline into a "
                f"{distro.family.value} image is not supported here (it needs the vendor's repositories); "
                "use an image that ships the agent, or install it in a VM")
        _apt_install(root, missing)
        installed_now = missing
        pkgs = _packages(root, distro.family)
    customize.configure_agent(root, distro, installed=pkgs)
    customize.configure_ssh(root, distro)
    customize.enable_units(root)
    modules = root / "lib/modules"
    kernels = sorted(p.name for p in modules.iterdir()) if modules.is_dir() else []
    return {"packages": pkgs, "kernel": kernels[-1] if kernels else "", "installed": installed_now}


def _serve(request: Mapping[str, Any]) -> dict[str, Any]:
    distro = pickle.loads(base64.b64decode(request["distro"]))
    if not isinstance(distro, Distro):
        raise BuildError("bad request: no distro entry")
    mnt = Path(tempfile.mkdtemp(prefix="imagekit-root-"))
    try:
        run(["mount", "-o", f"loop,offset={int(request['offset'])},sizelimit={int(request['sizelimit'])}",
             request["raw"], str(mnt)])
        try:
            return _configure(mnt, distro)
        finally:
            # Unmount explicitly (lazy for the bind mounts) so the file system is written back cleanly
            # before the loop device is released.
            subprocess.run(["umount", "-R", str(mnt)], check=False, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        if mnt.exists() and not os.listdir(mnt):
            os.rmdir(mnt)


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        reply = _serve(request)
    except ImagekitError as exc:
        reply = {"error": exc.message}
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
