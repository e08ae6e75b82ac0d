"""Provision a throwaway VM from a base image the way Azure does, and log in to it.

::

    with provision(distros.get("debian-12")) as pvm:
        print(pvm.guest.run("systemd-detect-virt").stdout)

The base image never changes: the VM boots a qcow2 overlay on it. The image's own agent provisions it
from the OVF ISO (CD-ROM) and the emulated fabric (:mod:`imagekit.fabric`), reached through the VM's
private network namespace (:mod:`imagekit.vm.netns`). The harness waits on the fabric's record of the
agent's health reports (an event, no fixed sleeps): Ready, or the agent's own failure description. Then
it logs in over SSH with the provisioned user and a throwaway key. With cloud-init, Ready is reported
before the user exists, so the SSH login (after cloud-init printed the host keys on the console, which
then also pins the host key) is what marks the VM as provisioned.

Timings (seconds after QEMU started): first console output, Ready, SSH ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import shlex
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imagekit.config.distros import Agent, Distro
from imagekit.config.profile import ProvisioningProfile
from imagekit.core.errors import ProvisioningError, VMError
from imagekit.core.log import Timings
from imagekit.core.paths import cache_dir
from imagekit.core.run import run
from imagekit.fabric import AgentReportedFailure, Fabric, ReadyTimeout, ReportedState, VMIdentity
from imagekit.fabric.keeper import Keeper, hand_over
from imagekit.media.iso import build_iso_bytes, write_ovf_iso
from imagekit.media.ovf import render_ovf_env
from imagekit.media.resource_disk import create_resource_disk
from imagekit.vm import kept as kept_vms
from imagekit.vm import qemu
from imagekit.vm.runner import VM, GuestNetwork, private_tmpdir
from imagekit.vm.ssh import (
    HostKeyPolicy,
    ReportedHostKeys,
    SSHGuest,
    SSHTimeout,
    generate_keypair,
    host_keys_from_console,
    load_private_key,
)

log = logging.getLogger(__name__)

DEFAULT_USERNAME = "azureuser"
READY_TIMEOUT = 900.0
SSH_TIMEOUT = 600.0
_KEYS_ON_CONSOLE = re.compile(r"-----END SSH HOST KEY KEYS-----")


@dataclass
class ProvisionedVM:
    """A provisioned, logged-in VM. ``guest`` runs commands; ``private_key`` exists while the VM does."""

    distro: Distro
    vm: VM
    fabric: Fabric
    guest: SSHGuest
    profile: ProvisioningProfile
    timings: Timings
    console_log: Path
    run_dir: Path
    private_key: Path
    host_key_source: str = ""
    ready_report: ReportedState | None = None
    kept: bool = False
    fabric_keeper: Keeper | None = None  # with ``kept``: the process serving the fabric until the VM exits
    notes: list[str] = field(default_factory=list)

    @property
    def username(self) -> str:
        return self.profile.username

    def ssh_command(self) -> str:
        """A shell command that logs in to the VM through its Unix socket (for ``--keep``)."""
        sock = self.vm.ssh_socket
        proxy = f"socat - UNIX-CONNECT:{sock}"
        return shlex.join([
            "ssh", "-i", os.fspath(self.private_key), "-o", f"ProxyCommand={proxy}",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            f"{self.username}@{self.profile.hostname}",
        ])


def _default_run_dir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return cache_dir() / "runs" / f"{stamp}-{name}"


def _run_dir(workdir: Path | None, name: str) -> Path:
    """The VM's run directory (console log, QEMU and namespace logs), made: under ``workdir`` or the cache."""
    run_dir = Path(workdir) / name if workdir else _default_run_dir(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _base_path(distro: Distro, base_image: Path | None) -> Path:
    """``base_image``, or the distro's base image (built or found in the cache)."""
    if base_image is not None:
        return Path(base_image)
    from imagekit.base import ensure_base

    return ensure_base(distro).path


def _make_overlay(base: Path, overlay: Path) -> None:
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", os.fspath(base.resolve()),
         os.fspath(overlay)])


# waagent's daemon catches any exception, logs it as an UnhandledError event with the traceback, and
# restarts itself 15 s later, forever (azurelinuxagent/daemon/main.py): on Azure that is a provisioning
# timeout. The same exception this many times in a row is taken as that loop.
CRASH_LOOP_REPEATS = 3
CRASH_SCAN_BYTES = 256 * 1024  # the console's tail that is searched (the guest writes the console)
_DAEMON_RESTART = "Daemon ended with exception -- Sleep 15 seconds and restart daemon"
_EXCEPTION_LINE = re.compile(r"^\s*(?:\|\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)(?::\s.*)?)\s*$")


def agent_crash_loop(console: str, repeats: int = CRASH_LOOP_REPEATS) -> str | None:
    """The exception waagent's daemon keeps dying of, if its last ``repeats`` restarts on the console all
    followed the same exception; else None."""
    crashes: list[str] = []
    last_exception = ""
    for line in console.splitlines():
        m = _EXCEPTION_LINE.match(line)
        if m:
            last_exception = m.group(1)[:300]
        elif _DAEMON_RESTART in line:
            crashes.append(last_exception)
            last_exception = ""
    tail = crashes[-repeats:]
    if len(tail) == repeats and tail[0] and all(c == tail[0] for c in tail):
        return tail[0]
    return None


def _console_tail_bytes(vm: VM, limit: int = CRASH_SCAN_BYTES) -> str:
    try:
        with vm.console_log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            return f.read(limit).decode(errors="replace")
    except OSError:
        return ""


def _wait_ready(vm: VM, fabric: Fabric, timeout: float, *, watch_crashes: bool = False) -> ReportedState:
    deadline = time.monotonic() + timeout
    next_scan = time.monotonic() + 5.0
    while True:
        vm.check()
        if watch_crashes and time.monotonic() >= next_scan:
            next_scan = time.monotonic() + 5.0
            crash = agent_crash_loop(_console_tail_bytes(vm))
            if crash is not None:
                raise ProvisioningError(
                    f"VM {vm.name}: waagent's daemon keeps crashing ({CRASH_LOOP_REPEATS} restarts in a row, each "
                    f"after the same exception: {crash}); it would never report Ready, which on Azure is a "
                    "provisioning timeout", console_tail=vm.console_tail(),
                    hint=f"the agent's traceback is in the console log: {vm.console_log}")
        remaining = deadline - time.monotonic()
        try:
            return fabric.wait_for_ready(max(0.0, min(1.0, remaining)))
        except AgentReportedFailure as exc:
            raise ProvisioningError(f"VM {vm.name}: {exc.message}", console_tail=vm.console_tail(),
                                    hint=f"full console log: {vm.console_log}") from exc
        except ReadyTimeout as exc:
            if remaining <= 0:  # the message names the whole wait, not the last one-second slice of it
                raise ProvisioningError(f"VM {vm.name}: {fabric.state.ready_timeout_message(timeout)}",
                                        console_tail=vm.console_tail(),
                                        hint=f"full console log: {vm.console_log}") from exc


def _check_waagent_provisioned(vm: VM, fabric: Fabric) -> None:
    """waagent reports NotReady (Provisioning) before it creates the user, on every real provisioning. An
    image that still holds an earlier VM's provisioned marker (not deprovisioned) makes it skip straight
    to Ready with a new VM id and never create the new user: on Azure that is a provisioning timeout. Say
    so now instead of waiting for an SSH login that cannot work."""
    if any(r.state == "NotReady" and r.substatus == "Provisioning" for r in fabric.reports()):
        return
    raise ProvisioningError(
        f"VM {vm.name}: waagent reported Ready without provisioning (no 'NotReady (Provisioning)' report "
        "before Ready): the image still holds a provisioned marker (/var/lib/waagent/provisioned) from an "
        "earlier VM, so the new user and keys were never applied",
        console_tail=vm.console_tail(),
        hint="generalize the image with 'waagent -force -deprovision+user' before capturing it")


@dataclass
class _Media:
    """What the VM boots from, made before launch in its private directory (removed with it)."""

    profile: ProvisioningProfile
    key_path: Path
    overlay: Path
    resource_disk: Path
    iso: Path


def _profile_for(profile: ProvisioningProfile | None, *, hostname: str, username: str, public_key: str,
                 custom_data: bytes | None) -> ProvisioningProfile:
    """The given profile with the harness's throwaway key added, or a default one for ``username``."""
    if profile is None:
        return ProvisioningProfile.create(hostname=hostname, username=username, ssh_public_keys=[public_key],
                                          custom_data=custom_data)
    return dataclasses.replace(profile, ssh_public_keys=(*profile.ssh_public_keys, public_key),
                               custom_data=profile.custom_data if custom_data is None else custom_data)


def _write_iso(profile: ProvisioningProfile, iso: Path, ovf_transform: Callable[[str], str] | None) -> None:
    if ovf_transform is None:
        write_ovf_iso(profile, iso)
        return
    xml = ovf_transform(render_ovf_env(profile))
    fd = os.open(iso, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(build_iso_bytes(xml.encode()))


def _prepare_media(private: Path, base_image: Path, profile: ProvisioningProfile | None, *, hostname: str,
                   username: str, custom_data: bytes | None, resource_disk_mib: int,
                   ovf_transform: Callable[[str], str] | None) -> _Media:
    """Pre-launch: the throwaway SSH key, the profile, the OS disk overlay, the resource disk and the OVF ISO."""
    key_path, public_key = generate_keypair(private)
    prof = _profile_for(profile, hostname=hostname, username=username, public_key=public_key,
                        custom_data=custom_data)
    overlay = private / "os.qcow2"
    _make_overlay(base_image, overlay)
    resource = create_resource_disk(private / "resource.raw", resource_disk_mib)
    iso = private / "ovf.iso"
    _write_iso(prof, iso, ovf_transform)
    return _Media(profile=prof, key_path=key_path, overlay=overlay, resource_disk=resource, iso=iso)


def _new_identity() -> VMIdentity:
    """A new VM: a fresh VM UUID (its SMBIOS UUID and IMDS vmId) and MAC, the address QEMU's DHCP gives."""
    return VMIdentity(vm_uuid=uuid.uuid4(), mac=qemu.random_mac(), ip=qemu.GUEST_DHCP_START,
                      prefix_len=int(qemu.GUEST_NET.split("/")[1]))


def _guest_network(fabric: Fabric, sockdir: Path, mac: str, hostname: str) -> GuestNetwork:
    """Start the VM's own fabric on Unix sockets in its private directory; the namespace relays to them."""
    sockdir.mkdir(mode=0o700)
    paths = fabric.start(sockdir)
    return GuestNetwork(mac=mac, hostname=hostname, wire_socket=paths.wire, hostga_socket=paths.hostga,
                        imds_socket=paths.imds, dns_names=fabric.dns_names())


def _wait_provisioned(vm: VM, fabric: Fabric, distro: Distro, timeout: float) -> ReportedState:
    """Post-launch: the agent's Ready report (or its own failure), and for waagent proof it provisioned."""
    ready = _wait_ready(vm, fabric, timeout, watch_crashes=distro.agent is Agent.WAAGENT)
    if distro.agent is Agent.WAAGENT:
        _check_waagent_provisioned(vm, fabric)
    vm.mark("ready")
    return ready


_MIN_CONNECT_SECONDS = 10.0  # SSH gets at least this long once the host keys are in, however late they came


def _host_key_policy(vm: VM, distro: Distro, media: _Media, ssh_timeout: float) -> HostKeyPolicy:
    if distro.agent is not Agent.CLOUD_INIT:
        return HostKeyPolicy()
    # cloud-init prints the host keys late (final stage), after creating the user: waiting for them is also
    # waiting for the user, and lets the first login check the host key.
    try:
        vm.wait_console(_KEYS_ON_CONSOLE, timeout=ssh_timeout,
                        what="cloud-init's SSH host keys on the serial console")
    except VMError as exc:
        if not vm.running():
            raise
        raise ProvisioningError(
            f"VM {vm.name}: SSH login as {media.profile.username} did not succeed within {ssh_timeout:.0f} s: "
            "cloud-init's SSH host keys never appeared on the serial console (its final stage did not finish, "
            "or keys_to_console is off)", console_tail=vm.console_tail(),
            hint=f"full console log: {vm.console_log}") from exc
    vm.mark("host keys on console")

    def reported() -> ReportedHostKeys:
        return host_keys_from_console(vm.console_text())

    return HostKeyPolicy(reported=reported)


def _login(vm: VM, distro: Distro, media: _Media, ssh_timeout: float) -> tuple[SSHGuest, HostKeyPolicy]:
    """Post-launch: log in over SSH as the provisioned user with the throwaway key. ``ssh_timeout`` bounds the
    whole phase: waiting for cloud-init's host keys and the login itself."""
    deadline = time.monotonic() + ssh_timeout
    policy = _host_key_policy(vm, distro, media, ssh_timeout)
    if vm.ssh_socket is None:
        raise ProvisioningError(f"VM {vm.name}: no SSH socket (the VM did not start its SSH relay)")
    guest = SSHGuest(vm.ssh_socket, media.profile.username, load_private_key(media.key_path), policy=policy,
                     name=vm.name, sudo_password=media.profile.password)
    try:
        guest.connect(max(deadline - time.monotonic(), _MIN_CONNECT_SECONDS), alive=vm.check)
    except SSHTimeout as exc:
        raise ProvisioningError(
            f"VM {vm.name}: SSH login as {media.profile.username} did not succeed within {ssh_timeout:.0f} s "
            f"({exc.message})", console_tail=vm.console_tail(), hint=f"full console log: {vm.console_log}") from exc
    vm.mark("ssh ready")
    return guest, policy


def _hand_over(pvm: ProvisionedVM, private: Path) -> Keeper:
    """Keep: the VM outlives this process, so its fabric must too (as Azure's does). A failed handover
    raises, and the VM is torn down like any failed run."""
    vm = pvm.vm
    vm.check()
    if vm.child_pid is None:
        raise ProvisioningError(f"VM {vm.name}: cannot keep it: its namespace child is gone")
    keeper = hand_over(pvm.fabric, watch_pid=vm.child_pid, log_path=pvm.run_dir / "fabric-keeper.log")
    kept_vms.record(private, name=vm.name, distro=pvm.distro.id, run_dir=pvm.run_dir,
                    ssh_command=pvm.ssh_command(), child_pid=vm.child_pid, qemu_pid=vm.qemu_pid,
                    keeper_pid=keeper.pid)
    return keeper


@contextlib.contextmanager
def provision(
    distro: Distro,
    *,
    profile: ProvisioningProfile | None = None,
    custom_data: bytes | None = None,
    keep: bool = False,
    workdir: Path | None = None,
    base_image: Path | None = None,
    memory_mib: int = 1024,
    cpus: int | None = None,
    resource_disk_mib: int = 2048,
    ready_timeout: float = READY_TIMEOUT,
    ssh_timeout: float = SSH_TIMEOUT,
    accel: qemu.Accel | None = None,
    name: str | None = None,
    username: str = DEFAULT_USERNAME,
    ovf_transform: Callable[[str], str] | None = None,
) -> Iterator[ProvisionedVM]:
    """Boot ``distro``'s base image as a fresh VM, let its agent provision it, log in; tear down after.

    ``profile`` defaults to user ``username`` (``azureuser``) with a throwaway Ed25519 key and a random hostname;
    a given profile gets the throwaway key added to its keys (the harness needs to log in).
    ``custom_data`` goes into the profile (the default one or the given one). ``workdir`` receives the
    run directory (console log, QEMU and namespace logs); default ``cache_dir()/runs/<time>-<name>``.
    ``keep`` leaves the VM running when the block ends without an error (:attr:`ProvisionedVM.kept`), its
    fabric served by a detached keeper process (:mod:`imagekit.fabric.keeper`) until the VM exits.
    ``ovf_transform`` rewrites the rendered ovf-env.xml before it goes on the ISO (fault tests).

    The phases: pre-launch (:func:`_prepare_media`), launch (the fabric, then QEMU in its namespace),
    post-launch (:func:`_wait_provisioned`, :func:`_login`), the caller's block, then keep
    (:func:`_hand_over`) or shut down; the private directory goes either way unless the VM is kept.
    """
    suffix = secrets.token_hex(3)
    vm_name = name or f"{distro.id}-{suffix}"
    run_dir = _run_dir(workdir, vm_name)
    timings = Timings()
    vlog: logging.Logger | logging.LoggerAdapter[logging.Logger] = log
    base_image = _base_path(distro, base_image)
    private = private_tmpdir(vm_name)
    keeper: Keeper | None = None
    try:
        media = _prepare_media(private, Path(base_image), profile, hostname=profile.hostname if profile else
                               f"ik-{suffix}", username=username, custom_data=custom_data,
                               resource_disk_mib=resource_disk_mib, ovf_transform=ovf_transform)
        identity = _new_identity()
        with Fabric(media.profile, identity, name=vm_name) as fabric:
            network = _guest_network(fabric, private / "fabric", identity.mac, media.profile.hostname)
            with VM(vm_name, run_dir=run_dir, memory_mib=memory_mib, cpus=cpus, os_disk=media.overlay,
                    iso=media.iso, resource_disk=media.resource_disk, network=network, accel=accel,
                    vm_uuid=identity.vm_uuid, private_dir=private, keep=keep, timings=timings) as vm:
                vlog = vm.log
                ready = _wait_provisioned(vm, fabric, distro, ready_timeout)
                guest, policy = _login(vm, distro, media, ssh_timeout)
                pvm = ProvisionedVM(distro=distro, vm=vm, fabric=fabric, guest=guest, profile=media.profile,
                                    timings=timings, console_log=vm.console_log, run_dir=run_dir,
                                    private_key=media.key_path, host_key_source=policy.how, ready_report=ready)
                try:
                    yield pvm
                finally:
                    guest.close()
                if keep:
                    keeper = _hand_over(pvm, private)
        if keeper is not None:
            pvm.kept = True
            pvm.fabric_keeper = keeper
            vlog.info("kept running (its fabric is served by process %d until the VM exits); log in with:\n  %s",
                      keeper.pid, pvm.ssh_command())
    except BaseException:
        if keeper is not None:
            keeper.stop()
            keeper = None
        raise
    finally:
        if keeper is None:
            shutil.rmtree(private, ignore_errors=True)
        vlog.info("timings (s after QEMU start): %s", timings.as_dict())


_LOGIN_PROMPT = re.compile(r"^\S+ login: ", re.M)


def plain_boot(distro: Distro, *, base_image: Path | None = None, workdir: Path | None = None,
               memory_mib: int = 1024, cpus: int | None = None, accel: qemu.Accel | None = None,
               timeout: float = READY_TIMEOUT) -> float:
    """The guest's own boot, for comparison: the same VM as :func:`provision` makes (same hardware, NIC and
    emulated fabric) but with no provisioning DVD and no resource disk, so the agent has nothing to do.
    Returns the seconds from QEMU's start to the serial console's login prompt."""
    base_image = _base_path(distro, base_image)
    vm_name = f"{distro.id}-plain-{secrets.token_hex(3)}"
    run_dir = _run_dir(workdir, vm_name)
    private = private_tmpdir(vm_name)
    try:
        overlay = private / "os.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", Path(base_image).resolve(), overlay])
        _key, public_key = generate_keypair(private)  # the fabric's IMDS answers name a key; nobody logs in
        profile = ProvisioningProfile.create(hostname=f"ik-{secrets.token_hex(3)}", username=DEFAULT_USERNAME,
                                             ssh_public_keys=(public_key,))
        identity = _new_identity()
        with Fabric(profile, identity, name=vm_name) as fabric:
            network = _guest_network(fabric, private / "fabric", identity.mac, profile.hostname)
            with VM(vm_name, run_dir=run_dir, memory_mib=memory_mib, cpus=cpus, os_disk=overlay, network=network,
                    accel=accel, vm_uuid=identity.vm_uuid, private_dir=private) as vm:
                vm.wait_console(_LOGIN_PROMPT, timeout=timeout, what="the login prompt on the serial console")
                return vm.mark("login prompt")
    finally:
        shutil.rmtree(private, ignore_errors=True)
