"""The resource-disk test set-up, checked against the agents' own code (unpacked from the Debian packages):
the /run shim really redirects waagent's disk lookup (2.7.3 and 2.12), the CustomData is a cloud-config
cloud-init's own schema and partitioning code accept (22.4 and 25.1), and the undo removes exactly the
lines the set-up caused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagekit.config import distros
from imagekit.core.errors import BuildError, InputError
from imagekit.provision.resource_setup import (
    RESOURCE_DISK,
    SHIM_MARK,
    cloud_config,
    dropin_source,
    fstab_cleanup_command,
    plan_for,
    resource_disk_custom_data,
    shim_source,
    undo_test_setup,
)
from imagekit.vm.guest import CommandResult

LOOKUP = r"""
import sys
from azurelinuxagent.common import logger
logger.add_logger_appender(logger.AppenderType.FILE, logger.LogLevel.INFO, sys.argv[1])
from azurelinuxagent.common.osutil import get_osutil
from azurelinuxagent.daemon.resourcedisk import get_resourcedisk_handler
handler = get_resourcedisk_handler()
print(type(handler.osutil).__name__, handler.osutil.device_for_ide_port(1), get_osutil().device_for_ide_port(0))
"""


def _lookup(site: Path, tmp: Path, shim: bool, extra: list[str] | None = None) -> tuple[str, str]:
    fake = tmp / "dev-sdz"
    fake.touch()
    link = tmp / "by-id-RESOURCEDISK"
    if not link.exists():
        link.symlink_to(fake)
    shim_dir = tmp / "shim"
    shim_dir.mkdir(exist_ok=True)
    (shim_dir / "sitecustomize.py").write_text(shim_source(str(link)))
    log = tmp / "waagent.log"
    paths = ([str(shim_dir)] if shim else []) + (extra or []) + [str(site)]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join(paths)}
    out = subprocess.run([sys.executable, "-c", LOOKUP, str(log)], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout.strip(), log.read_text() if log.exists() else ""


def test_shim_redirects_waagents_own_lookup_and_says_so(waagent_lib: Path, tmp_path: Path) -> None:
    without, _ = _lookup(waagent_lib, tmp_path, shim=False)
    # This host has no Hyper-V VMBus either: the agent's own lookup finds nothing, as under QEMU.
    assert without.split()[1:] == ["None", "None"]
    with_shim, log = _lookup(waagent_lib, tmp_path, shim=True)
    cls, port1, port0 = with_shim.split()
    assert cls == "DebianOSUtil"  # the subclass the Debian package picks still goes through the shim
    assert port1 == "dev-sdz"  # the kernel name the by-id link resolves to
    assert port0 == "None"  # other ports keep the agent's own VMBus lookup
    assert f"{SHIM_MARK}: device_for_ide_port(1) -> dev-sdz" in log
    assert "Hyper-V VMBus lookup bypassed" in log


def test_shim_still_runs_the_distros_own_sitecustomize(waagent_lib: Path, tmp_path: Path) -> None:
    other = tmp_path / "distro-site"
    other.mkdir()
    marker = tmp_path / "distro-sitecustomize-ran"
    (other / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    out, _ = _lookup(waagent_lib, tmp_path, shim=True, extra=[str(other)])
    assert marker.exists()
    assert out.split()[1] == "dev-sdz"


def test_dropin_only_sets_pythonpath_to_the_run_shim() -> None:
    text = dropin_source()
    assert "[Service]\nEnvironment=PYTHONPATH=/run/imagekit/waagent-shim\n" in text
    src = shim_source()
    compile(src, "sitecustomize.py", "exec")  # the agent's interpreter must be able to load it
    assert repr(RESOURCE_DISK) in src


@pytest.mark.parametrize("swap_percent", [None, 33])
def test_custom_data_is_a_cloud_config_cloud_init_accepts(cloudinit_lib: Path, swap_percent: int | None) -> None:
    from cloudinit import util
    from cloudinit.config import cc_disk_setup
    from cloudinit.config.schema import get_schema, validate_cloudconfig_schema
    from cloudinit.handlers import type_from_starts_with

    d = distros.get("debian-12-cloudinit")
    data = resource_disk_custom_data(d, swap_percent=swap_percent)
    assert data is not None
    text = data.decode()
    assert type_from_starts_with(text) == "text/cloud-config"
    cfg = util.load_yaml(text)
    validate_cloudconfig_schema(cfg, get_schema(), strict=True)  # raises on any schema error
    assert cfg["device_aliases"] == {"ephemeral0": RESOURCE_DISK}
    disk = cfg["disk_setup"]["ephemeral0"]
    # cloud-init's own partitioning code turns the layout into sfdisk/sgdisk input for a 2 GiB disk.
    layout = cc_disk_setup.get_partition_layout(disk["table_type"], 4194304, disk["layout"])
    assert layout
    if swap_percent:
        assert [m[2] for m in cfg["mounts"]] == ["auto", "swap"]
        assert {f["filesystem"] for f in cfg["fs_setup"]} == {"ext4", "swap"}
    else:
        assert [m[1] for m in cfg["mounts"]] == ["/mnt"]


def test_waagent_images_get_no_custom_data_and_their_plan_follows_waagent_conf() -> None:
    d12, d13 = distros.get("debian-12"), distros.get("debian-13")
    assert resource_disk_custom_data(d12) is None
    p12, p13 = plan_for(d12), plan_for(d13)
    assert (p12.swap, p12.swap_mib, p12.mount_point, p12.filesystem) == ("file", 256, "/mnt/resource", "ext4")
    assert (p13.swap, p13.swap_mib) == ("none", 0)
    assert "VMBus" in p12.note and "bypassed" in p12.note
    with pytest.raises(InputError, match="swap_percent is for cloud-init images"):
        plan_for(d12, swap_percent=30)
    with pytest.raises(InputError, match="out of range"):
        plan_for(distros.get("debian-12-cloudinit"), swap_percent=95)
    with pytest.raises(InputError, match="only for cloud-init"):
        cloud_config(p12)


# --- undo ---------------------------------------------------------------------------------------------

FSTAB = (
    "# /etc/fstab: static file system information.\n"
    "UUID=0a1b2c3d / ext4 errors=remount-ro 0 1\n"
    f"{RESOURCE_DISK}-part1\t/mnt\tauto\tdefaults,nofail,x-systemd.after=cloud-init.service,_netdev,comment=cloudconfig\t0\t2\n"
    f"{RESOURCE_DISK}-part2\tnone\tswap\tsw,nofail,comment=cloudconfig\t0\t0\n"
    "/dev/vdc1 /data ext4 defaults,comment=cloudconfig 0 2\n"
)


def test_fstab_cleanup_removes_only_the_resource_disk_lines(tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text(FSTAB)
    subprocess.run(["sh", "-c", fstab_cleanup_command(RESOURCE_DISK, str(fstab))], check=True)
    assert fstab.read_text() == (
        "# /etc/fstab: static file system information.\n"
        "UUID=0a1b2c3d / ext4 errors=remount-ro 0 1\n"
        "/dev/vdc1 /data ext4 defaults,comment=cloudconfig 0 2\n"
    )


@dataclass
class FstabGuest:
    """A test double for the guest: /etc/fstab is a real file under tmp (its commands run for real with
    the path substituted); swap and mount state are canned; everything else succeeds and is recorded."""

    fstab: Path
    swaps: str = ""
    mounts: str = ""
    ignore_sed: bool = False
    calls: list[str] = field(default_factory=list)

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        self.calls.append(command)
        if "/proc/swaps" in command and "awk" in command:
            return CommandResult(command, 0, self.swaps, "")
        if "findmnt" in command:
            return CommandResult(command, 0, self.mounts, "")
        if "/etc/fstab" in command and not (self.ignore_sed and command.startswith("sed")):
            p = subprocess.run(["sh", "-c", command.replace("/etc/fstab", str(self.fstab))], capture_output=True,
                               text=True)
            return CommandResult(command, p.returncode, p.stdout, p.stderr)
        return CommandResult(command, 0, "", "")


def test_undo_removes_fstab_lines_turns_swap_off_and_unmounts(tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text(FSTAB)
    guest = FstabGuest(fstab, swaps="/dev/sdb2\n", mounts="/mnt/resource\n")
    d = distros.get("debian-12-cloudinit")
    plan = plan_for(d, swap_percent=33)
    done = undo_test_setup(guest, d, plan)
    assert RESOURCE_DISK not in fstab.read_text()
    assert "UUID=0a1b2c3d /" in fstab.read_text() and "/dev/vdc1" in fstab.read_text()
    assert any(c == "swapoff /dev/sdb2" for c in guest.calls)
    assert any(c.startswith("umount /mnt/resource") for c in guest.calls)
    assert any("removed from /etc/fstab" in x for x in done)
    assert not any(c.startswith("rmdir /mnt") for c in guest.calls)  # /mnt is the distro's own directory


def test_undo_fails_loudly_when_the_lines_stay(tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text(FSTAB)
    guest = FstabGuest(fstab, ignore_sed=True)
    with pytest.raises(BuildError, match="still in /etc/fstab"):
        undo_test_setup(guest, distros.get("debian-12-cloudinit"))


def test_undo_on_a_waagent_guest_leaves_fstab_alone(tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text("UUID=0a1b2c3d / ext4 errors=remount-ro 0 1\n")
    guest = FstabGuest(fstab, mounts="/mnt/resource\n")
    done = undo_test_setup(guest, distros.get("debian-12"))
    assert fstab.read_text() == "UUID=0a1b2c3d / ext4 errors=remount-ro 0 1\n"
    assert "umount /mnt/resource" in done
    assert any("/run shim" in x for x in done)
    assert not any(c.startswith("sed") for c in guest.calls)


def test_custom_data_is_json_yaml_with_the_cloud_config_header() -> None:
    data = resource_disk_custom_data(distros.get("debian-12-cloudinit"))
    assert data is not None and data.startswith(b"#cloud-config\n")
    assert json.loads(data.split(b"\n", 1)[1])["fs_setup"][0]["replace_fs"] == "ntfs"


# --- waagent shim installation and the wait on the agent ----------------------------------------------


@dataclass
class AgentGuest:
    """A test double for a waagent guest: file writes under /run really happen (under ``root``); the agent
    is simulated — after ``systemctl restart`` it takes ``polls`` log polls before its shim lookup shows
    up in waagent.log, then the disk is mounted and the swap file active."""

    root: Path
    polls: int = 2
    lookups: int = 1  # the boot before the shim: one failed VMBus lookup was logged, no shim line
    restarted: bool = False
    calls: list[str] = field(default_factory=list)

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        self.calls.append(command)
        ok = CommandResult(command, 0, "", "")
        if command.startswith("readlink -f"):
            return CommandResult(command, 0, "/dev/sdb\n", "")
        if command.startswith("systemctl list-unit-files"):
            return CommandResult(command, 0, "walinuxagent.service enabled enabled\n", "")
        if command.startswith("mkdir -p /run/"):
            p = subprocess.run(["sh", "-c", command.replace("/run/", f"{self.root}/run/")], capture_output=True,
                               text=True)
            return CommandResult(command, p.returncode, p.stdout, p.stderr)
        if command.startswith("systemctl show -p Environment"):
            env = (self.root / "run/systemd/system/walinuxagent.service.d/imagekit-resource-disk-shim.conf")
            text = env.read_text() if env.exists() else ""
            return CommandResult(command, 0, "\n".join(ln for ln in text.splitlines() if ln.startswith("Env")), "")
        if command.startswith("systemctl restart"):
            self.restarted = True
            return ok
        if command.startswith("grep -c"):
            if self.restarted:
                self.polls -= 1
            shim_lines = 1 if self.restarted and self.polls < 0 else 0
            return CommandResult(command, 0 if shim_lines else 1, f"{shim_lines}\n", "")
        if command.startswith("awk"):
            return CommandResult(command, 0, f"INFO {SHIM_MARK}: device_for_ide_port(1) -> sdb\n"
                                 "INFO Enabled 262144KB of swap at /mnt/resource/swapfile\n"
                                 "/mnt/resource is a mountpoint\n/mnt/resource/swapfile file 262140 0 -2\n", "")
        return ok


def test_shim_install_writes_only_under_run_and_waits_for_the_agents_next_lookup(tmp_path: Path) -> None:
    from imagekit.provision.resource_setup import activate_resource_disk

    guest = AgentGuest(tmp_path)
    facts = activate_resource_disk(guest, plan_for(distros.get("debian-12")), timeout=60, poll=0.01)
    shim = tmp_path / "run/imagekit/waagent-shim/sitecustomize.py"
    dropin = tmp_path / "run/systemd/system/walinuxagent.service.d/imagekit-resource-disk-shim.conf"
    assert shim.read_text() == shim_source()
    assert dropin.read_text() == dropin_source()
    assert oct(shim.stat().st_mode & 0o777) == "0o644"
    writes = [c for c in guest.calls if ">" in c or "mv " in c]
    assert writes and all("/run/" in c and "/etc/" not in c for c in writes)
    order = [c.split()[0] + " " + c.split()[1] for c in guest.calls if c.startswith("systemctl")]
    assert order.index("systemctl daemon-reload") < order.index("systemctl restart")
    assert "resource_disk_timeout" not in facts
    assert sum(c.startswith("grep -c") for c in guest.calls) >= 3  # it waited for the restart's lookup
    assert "VMBus" in facts["resource_disk_note"]


def test_agent_that_never_handles_the_disk_is_reported_not_waited_on_forever(tmp_path: Path) -> None:
    from imagekit.provision.resource_setup import activate_resource_disk

    guest = AgentGuest(tmp_path, polls=10**9)
    facts = activate_resource_disk(guest, plan_for(distros.get("debian-12")), timeout=0.2,
                                   poll=0.01)
    assert "did not finish with the resource disk" in facts["resource_disk_timeout"]


def test_waagent_with_format_off_installs_nothing_and_does_not_wait(tmp_path: Path) -> None:
    from dataclasses import replace

    from imagekit.provision.resource_setup import activate_resource_disk

    guest = AgentGuest(tmp_path, polls=10**9)
    plan = replace(plan_for(distros.get("debian-12")), formatted=False, swap="none", swap_mib=0)
    facts = activate_resource_disk(guest, plan, timeout=30, poll=0.01)
    assert guest.calls == []
    assert "Format=n" in facts["resource_disk_note"] and "resource_disk_timeout" not in facts
