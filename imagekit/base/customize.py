"""Turn a freshly bootstrapped Debian root directory into an Azure-ready one, from the distro table.

Everything here edits files under a root directory (plus a few commands run in a plain ``chroot``
that need no /proc or /dev), so it runs without mounts and can be tested on any directory tree.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Collection
from pathlib import Path

from imagekit.config.distros import Agent, Distro
from imagekit.core.errors import BuildError
from imagekit.core.run import run

log = logging.getLogger(__name__)

# Drivers the initramfs must carry: Hyper-V (Azure's VMBus storage and network) and virtio (QEMU here).
INITRAMFS_MODULES = ("hv_vmbus", "hv_storvsc", "hv_netvsc", "hv_utils",
                     "virtio_pci", "virtio_scsi", "virtio_blk", "virtio_net")
# Modules that must exist in the image: the provisioning DVD (udf, iso9660) and vfat.
REQUIRED_MODULES = ("udf", "vfat", "isofs", *INITRAMFS_MODULES)
GRUB_TIMEOUT_S = 1
HOSTKEY_UNIT = "ssh-host-keys-generate.service"
# No file the image ships has "imagekit" in its name: the leak scan treats such names as test artifacts.

_INITRAMFS_HOOK = """#!/bin/sh
# The Hyper-V and virtio drivers the root disk may sit behind, whatever MODULES= says.
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0;; esac
. /usr/share/initramfs-tools/hook-functions
for m in {modules}; do
    manual_add_modules "$m"
done
"""

_HOSTKEY_UNIT_TEXT = """[Unit]
Description=Generate SSH host keys
DefaultDependencies=no
# After cloud-init's network stage, which makes keys itself on Azure (then there is nothing left to do);
# before sshd, which does not start without keys, and the agent, which reports a key's thumbprint.
After=local-fs.target cloud-init.service cloud-init-network.service
Before=ssh.service ssh.socket sshd.service walinuxagent.service
ConditionPathIsReadWrite=/etc/ssh{condition}

[Service]
Type=oneshot
ExecStart={command}
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target ssh.service
"""
# Every key type, for images whose agent keeps the keys made at first boot (cloud-init makes its own).
_HOSTKEY_ALL = "/usr/bin/ssh-keygen -A"
# waagent with Provisioning.RegenerateSshHostKeyPair=y deletes every host key while provisioning and makes
# its own (SshHostKeyPairType), so what first boot makes only has to let sshd start: one Ed25519 key, in
# well under a second, instead of RSA-3072 + ECDSA + Ed25519 (RSA key generation took 30 s and more in a
# TCG guest, and the agent waited for it). Only when no host key exists, so a reboot keeps the agent's.
_HOSTKEY_ONE = "/usr/bin/ssh-keygen -q -N '' -t ed25519 -f /etc/ssh/ssh_host_ed25519_key"
_HOSTKEY_NONE_YET = "\nConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key"

# Agent units that Debian orders After=multi-user.target: the agent then waits for the whole boot (sshd's
# host keys, e2scrub_reap, logind, the gettys). What it needs is the network (a route to the WireServer)
# and sshd running, which is upstream's own ordering (network-online.target) plus ssh.service.
AGENT_UNIT_NAMES = ("walinuxagent.service", "waagent.service")
AGENT_UNIT_AFTER = "network-online.target ssh.service"
_UNIT_DIRS = ("etc/systemd/system", "lib/systemd/system", "usr/lib/systemd/system")
WAIT_ONLINE_UNIT = "ifupdown-wait-online.service"
WAIT_ONLINE_METHOD = "route"  # wait-online.sh: until a default route exists (what the agent's DHCP check needs)


def setup_hook_tree(dest: Path) -> None:
    """Files placed before any package is installed, so the kernel's first initramfs already has them."""
    hook = dest / "etc/initramfs-tools/hooks/azure-drivers"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(_INITRAMFS_HOOK.replace("{modules}", " ".join(INITRAMFS_MODULES)))
    hook.chmod(0o755)


def kernel_version(root: Path) -> str:
    versions = sorted(p.name for p in (root / "lib/modules").iterdir() if (p / "modules.dep").exists())
    if len(versions) != 1:
        raise BuildError(f"expected exactly one kernel in the image, found {versions or 'none'}")
    return versions[0]


def kernel_cmdline(distro: Distro, root_uuid: str) -> str:
    return " ".join([f"root=UUID={root_uuid}", "ro", *distro.kernel_cmdline])


def apply_waagent_conf(text: str, settings: dict[str, str]) -> str:
    """Set each key in waagent.conf text: replace its first (possibly commented) line, else append."""
    lines = text.splitlines()
    for key, value in settings.items():
        pat = re.compile(rf"^\s*#?\s*{re.escape(key)}\s*=")
        for i, line in enumerate(lines):
            if pat.match(line):
                lines[i] = f"{key}={value}"
                break
        else:
            lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def read_waagent_conf(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def remove_matching(root: Path, patterns: Collection[str]) -> None:
    """Remove whatever matches each glob pattern under ``root`` (a directory with its contents; a symlink
    itself, never what it points to)."""
    for pattern in patterns:
        for p in root.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def _installed(root: Path, package: str) -> bool:
    return (root / "var/lib/dpkg/info" / f"{package}.list").exists() or any(
        (root / "var/lib/dpkg/info").glob(f"{package}:*.list"))


def configure_agent(root: Path, distro: Distro, installed: Collection[str] | None = None) -> None:
    """waagent.conf from the table; cloud-init's datasource list; fail when an agent package is missing.

    ``installed`` names the image's packages; by default they are read from its dpkg database.
    """
    missing = [p for p in distro.agent_packages
               if (p not in installed if installed is not None else not _installed(root, p))]
    if missing:
        raise BuildError(f"agent packages not installed in the image: {', '.join(missing)}")
    conf = root / "etc/waagent.conf"
    if conf.exists():
        conf.write_text(apply_waagent_conf(conf.read_text(), dict(distro.waagent_conf)))
    elif distro.waagent_conf:
        raise BuildError("the table sets waagent.conf values but the image has no /etc/waagent.conf")
    if distro.agent is Agent.WAAGENT:
        configure_agent_unit(root)
    if distro.agent is Agent.CLOUD_INIT or distro.cloud_init:
        # JSON is YAML; cloud-init merges this over cloud.cfg. Written even without cloud-init installed
        # would be pointless, so require it.
        if not (root / "etc/cloud").is_dir():
            raise BuildError("the table has cloud-init settings but cloud-init is not installed in the image")
        _write(root / "etc/cloud/cloud.cfg.d/90_azure_datasource.cfg",
               "# Written by imagekit from the distro table.\n" + json.dumps(dict(distro.cloud_init), indent=2) + "\n")


def _set_sshd_option(text: str, key: str, value: str) -> str:
    lines = text.splitlines()
    pat = re.compile(rf"^\s*#?\s*{key}\s", re.I)
    for i, line in enumerate(lines):
        if pat.match(line) and not line.lstrip().lower().startswith("match"):
            lines[i] = f"{key} {value}"
            break
    else:
        # Before any Match block, where a global setting must go.
        idx = next((i for i, line in enumerate(lines) if line.lstrip().lower().startswith("match ")), len(lines))
        lines.insert(idx, f"{key} {value}")
    return "\n".join(lines) + "\n"


def configure_ssh(root: Path, distro: Distro) -> None:
    """sshd settings from the table, no host keys, and a unit that makes them at first boot."""
    settings = {"ClientAliveInterval": str(distro.ssh.client_alive_interval),
                "PermitRootLogin": distro.ssh.permit_root_login}
    main = root / "etc/ssh/sshd_config"
    text = main.read_text() if main.exists() else ""
    if re.search(r"^\s*Include\s+/etc/ssh/sshd_config\.d/", text, re.M):
        _write(root / "etc/ssh/sshd_config.d/50-azure.conf",
               "# Written by imagekit from the distro table (Azure: ClientAliveInterval 30-235, 180 recommended).\n"
               + "".join(f"{k} {v}\n" for k, v in settings.items()))
    elif main.exists():
        # No drop-in directory in this sshd (older releases): set the values in the main file.
        for k, v in settings.items():
            text = _set_sshd_option(text, k, v)
        main.write_text(text)
    else:
        raise BuildError("openssh-server is not installed in the image (no /etc/ssh/sshd_config)")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    _write(root / "etc/systemd/system" / HOSTKEY_UNIT, hostkey_unit_text(distro))


def agent_regenerates_host_keys(distro: Distro) -> bool:
    """Does the image's agent replace the SSH host keys while provisioning (waagent's
    Provisioning.RegenerateSshHostKeyPair=y)?"""
    return distro.agent is Agent.WAAGENT and distro.waagent_conf.get("Provisioning.RegenerateSshHostKeyPair") == "y"


def hostkey_unit_text(distro: Distro) -> str:
    if agent_regenerates_host_keys(distro):
        return _HOSTKEY_UNIT_TEXT.format(condition=_HOSTKEY_NONE_YET, command=_HOSTKEY_ONE)
    return _HOSTKEY_UNIT_TEXT.format(condition="", command=_HOSTKEY_ALL)


def agent_unit_override(text: str) -> str | None:
    """The agent's unit with ``After=multi-user.target`` replaced by :data:`AGENT_UNIT_AFTER` (and the
    network wanted), or ``None`` when the unit is not ordered after multi-user.target.

    Dependencies cannot be removed by a drop-in, so this is a whole unit for /etc/systemd/system, made
    from the package's own text (everything else in it kept as the package ships it)."""
    section = ""
    out: list[str] = []
    changed = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped
        elif section == "[Unit]" and stripped.startswith("After=") and not changed:
            targets = stripped[len("After="):].split()
            if "multi-user.target" in targets:
                after = AGENT_UNIT_AFTER.split()
                rest = [t for t in targets if t not in ("multi-user.target", *after)]
                out.append("After=" + " ".join([*after, *rest]))
                out.append("Wants=network-online.target")
                changed = True
                continue
        out.append(line)
    if not changed:
        return None
    return "# Written by imagekit: the package's unit, ordered after the network and sshd instead of\n" \
           "# multi-user.target (the whole boot).\n" + "\n".join(out) + "\n"


def configure_agent_unit(root: Path) -> list[str]:
    """Start waagent once the network and sshd are up instead of after the whole boot (see
    :data:`AGENT_UNIT_NAMES`). Returns the units overridden."""
    done = []
    for name in AGENT_UNIT_NAMES:
        if (root / "etc/systemd/system" / name).is_file() and not (root / "etc/systemd/system" / name).is_symlink():
            continue  # already overridden (by the image or an earlier run)
        src = next((root / d / name for d in _UNIT_DIRS[1:] if (root / d / name).is_file()), None)
        if src is None:
            continue
        text = agent_unit_override(src.read_text())
        if text is not None:
            _write(root / "etc/systemd/system" / name, text)
            done.append(name)
    return done


def configure_network(root: Path, distro: Distro) -> None:
    """DHCP on eth0 through ifupdown, unless cloud-init is installed: it writes its own (50-cloud-init)
    and a second eth0 stanza would make ifup fail."""
    if _installed(root, "cloud-init"):
        return
    _write(root / "etc/network/interfaces.d/eth0",
           "# DHCP on the first NIC (net.ifnames=0 names it eth0), as on Azure.\n"
           "allow-hotplug eth0\niface eth0 inet dhcp\n")
    # network-online.target (which the agent waits for) must mean "DHCP gave a default route", the route
    # waagent's endpoint check looks for (else it sleeps 10 s and retries). ifupdown's wait-online service
    # is not enabled by default, and ifup@eth0 is a simple service (started = forked, not configured), so
    # network-online.target was reached before eth0 had an address. Enabled here, waiting for the route
    # (event-driven; its default method polls once a second). Only units that want network-online.target
    # wait for it; the login prompt does not.
    defaults = root / "etc/default/networking"
    text = defaults.read_text() if defaults.exists() else ""
    text = re.sub(r"^\s*WAIT_ONLINE_METHOD=.*\n?", "", text, flags=re.M).rstrip("\n")
    _write(defaults, (text + "\n" if text else "") + f"WAIT_ONLINE_METHOD={WAIT_ONLINE_METHOD}\n")
    wait_online = next((Path("/", d, WAIT_ONLINE_UNIT) for d in _UNIT_DIRS[1:]
                        if (root / d / WAIT_ONLINE_UNIT).is_file()), None)
    if wait_online is not None:
        link = root / "etc/systemd/system/network-online.target.wants" / WAIT_ONLINE_UNIT
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(wait_online)


def scrub_identity(root: Path) -> None:
    """Nothing host- or instance-specific ships: machine-id, hostname, resolver, passwords, history."""
    _write(root / "etc/machine-id", "", 0o444)
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() and not dbus_id.is_symlink():
        dbus_id.unlink()
    _write(root / "etc/hostname", "localhost\n")
    _write(root / "etc/hosts", "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
           "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n")
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    _write(resolv, "")  # filled by the DHCP client at boot
    shadow = root / "etc/shadow"
    lines = []
    for line in shadow.read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "root":
            fields[1] = "*"
        elif len(fields) > 1 and fields[1] not in ("*", "!", "!*", "") and not fields[1].startswith("!"):
            raise BuildError(f"user {fields[0]!r} has a password in the image; refusing to ship it")
        lines.append(":".join(fields))
    shadow.write_text("\n".join(lines) + "\n")
    remove_matching(root, ("root/.bash_history", "root/.ssh", "home/*/.bash_history", "home/*/.ssh",
                           "root/.lesshst", "root/.python_history", "var/lib/systemd/random-seed"))
    for p in (root / "home").glob("*"):
        raise BuildError(f"the image has a user home {p.name!r}; base images ship no users")


def configure_locale(root: Path) -> None:
    # cloud-init's locale module defaults to en_US.UTF-8 and logs an error when it cannot be generated.
    _write(root / "etc/locale.gen", "en_US.UTF-8 UTF-8\n")
    _write(root / "etc/default/locale", "LANG=en_US.UTF-8\n")
    run(["chroot", str(root), "locale-gen"])


def write_fstab(root: Path, root_uuid: str) -> None:
    _write(root / "etc/fstab", f"# <file system> <mount point> <type> <options> <dump> <pass>\n"
           f"UUID={root_uuid}\t/\text4\tdefaults,discard,errors=remount-ro\t0\t1\n")


def configure_grub(root: Path, distro: Distro, root_uuid: str, kver: str) -> tuple[Path, Path]:
    """A hand-written grub.cfg (serial console, short timeout, the table's command line) and core.img.

    Returns (boot.img, core.img) inside ``root`` for :func:`imagekit.base.disk.install_grub_bios`.
    """
    src = root / "usr/lib/grub/i386-pc"
    if not (src / "boot.img").exists():
        raise BuildError("grub-pc-bin is not installed in the image (no /usr/lib/grub/i386-pc/boot.img)")
    dst = root / "boot/grub/i386-pc"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix in (".mod", ".lst", ".img", ".o") and f.is_file():
            shutil.copy2(f, dst / f.name)
    cmdline = kernel_cmdline(distro, root_uuid)
    # /vmlinuz and /initrd.img are symlinks the kernel package keeps current, so the entry survives
    # kernel upgrades even though nothing regenerates this file.
    kernel = "/vmlinuz" if (root / "vmlinuz").is_symlink() else f"/boot/vmlinuz-{kver}"
    initrd = "/initrd.img" if (root / "initrd.img").is_symlink() else f"/boot/initrd.img-{kver}"
    _write(root / "boot/grub/grub.cfg", f"""# Written by imagekit.
serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1
terminal_input serial console
terminal_output serial console
set timeout={GRUB_TIMEOUT_S}
set timeout_style=menu
search --no-floppy --fs-uuid --set=root {root_uuid}
menuentry '{distro.name}' {{
    search --no-floppy --fs-uuid --set=root {root_uuid}
    linux {kernel} {cmdline}
    initrd {initrd}
}}
""")
    # For anyone who later runs update-grub inside the VM: the same settings.
    extra = " ".join(distro.kernel_cmdline)
    _write(root / "etc/default/grub", f"""GRUB_DEFAULT=0
GRUB_TIMEOUT={GRUB_TIMEOUT_S}
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="{extra}"
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1"
""")
    _write(root / "tmp/grub-early.cfg",
           f"search.fs_uuid {root_uuid} root\nset prefix=($root)/boot/grub\n")
    run(["chroot", str(root), "grub-mkimage", "-O", "i386-pc", "-o", "/boot/grub/i386-pc/core.img",
         "-c", "/tmp/grub-early.cfg", "-p", "/boot/grub",
         "biosdisk", "part_msdos", "ext2", "search_fs_uuid"])
    (root / "tmp/grub-early.cfg").unlink()
    return dst / "boot.img", dst / "core.img"


def enable_units(root: Path) -> None:
    run(["systemctl", f"--root={root}", "enable", HOSTKEY_UNIT, "serial-getty@ttyS0.service"])


def verify_kernel_modules(root: Path, kver: str) -> list[str]:
    """Fail unless every required module exists and the initramfs carries the disk/NIC drivers."""
    moddir = root / "lib/modules" / kver
    names = set()
    for line in (moddir / "modules.dep").read_text().splitlines():
        names.add(Path(line.split(":", 1)[0]).name.split(".ko")[0].replace("-", "_"))
    for line in (moddir / "modules.builtin").read_text().splitlines():
        names.add(Path(line).name.split(".ko")[0].replace("-", "_"))
    missing = [m for m in REQUIRED_MODULES if m not in names]
    if missing:
        raise BuildError(f"kernel {kver} lacks required modules: {', '.join(missing)}")
    listing = run(["chroot", str(root), "lsinitramfs", f"/boot/initrd.img-{kver}"]).stdout
    builtin = {Path(x).name.split(".ko")[0].replace("-", "_")
               for x in (moddir / "modules.builtin").read_text().splitlines()}
    in_initrd = {Path(x).name.split(".ko")[0].replace("-", "_") for x in listing.splitlines() if ".ko" in x}
    absent = [m for m in INITRAMFS_MODULES if m not in in_initrd and m not in builtin]
    if absent:
        raise BuildError(f"initramfs of {kver} lacks {', '.join(absent)}")
    return sorted(in_initrd & set(INITRAMFS_MODULES))


def final_cleanup(root: Path) -> None:
    remove_matching(root, ("var/cache/apt/*.bin", "var/lib/apt/lists/*_*", "var/cache/debconf/*-old",
                           "var/lib/dpkg/*-old", "tmp/*", "var/tmp/*"))
    for log_file in (root / "var/log").rglob("*"):
        # Build-time logs describe the build host's run, not the VM's; keep the files, drop the content.
        if log_file.is_file() and not log_file.is_symlink():
            log_file.write_bytes(b"")
