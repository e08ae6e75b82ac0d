"""QEMU command lines for Azure-like VMs, and the accelerator probe.

:func:`build_argv` is pure: a frozen :class:`VMSpec` in, an argv list out, no files touched and no
process started (launching lives in :mod:`imagekit.vm.runner` and :mod:`imagekit.vm.netns`). The guest sees what an
Azure generation 1 VM shows it:

* SMBIOS system "Microsoft Corporation" / "Virtual Machine" / "Hyper-V UEFI Release v4.1" and the chassis
  asset tag Azure sets, so ``systemd-detect-virt`` prints ``microsoft`` (waagent's unit has
  ``ConditionVirtualization=microsoft``) and cloud-init's ds-identify finds Azure. Under TCG the CPUID
  hypervisor bit is turned off, otherwise systemd would believe CPUID ("qemu") over DMI; under KVM the
  Hyper-V enlightenments make CPUID say "Microsoft Hv".
* the OS disk (a qcow2 overlay) as virtio-scsi LUN 0, the provisioning ISO as an IDE CD-ROM (``/dev/sr0``:
  waagent may take a second virtio-blk disk for the DVD), the resource disk as another SCSI disk whose
  serial ``RESOURCEDISK`` names it under ``/dev/disk/by-id``;
* virtio-rng, a virtio NIC on QEMU user networking laid out so that the default gateway is the
  WireServer address 168.63.129.16 (waagent accepts that route as proof of the endpoint), a pvpanic
  device so a kernel panic reaches QMP, the serial console in a file and QMP on a Unix socket.

:func:`probe_accel` decides between KVM and TCG once per host: it boots a tiny long-mode payload
(``scripts/kvm-probe.S``) under KVM with the exact CPU model a VM would get, bounded in time, and caches
the verdict in the cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from imagekit.core.errors import HostError, InputError
from imagekit.core.paths import cache_dir

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"

# Azure's identity as the guest reads it from SMBIOS (systemd's DMI table matches the "Hyper-V" prefix of
# the version; cloud-init and ds-identify match the chassis asset tag).
SMBIOS_MANUFACTURER = "Microsoft Corporation"
SMBIOS_PRODUCT = "Virtual Machine"
SMBIOS_VERSION = "Hyper-V UEFI Release v4.1"
AZURE_CHASSIS_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"

WIRESERVER_IP = "168.63.129.16"
IMDS_IP = "169.254.169.254"
# The WireServer is slirp's host address, so it is the guest's default gateway (waagent accepts that route
# as proof of the endpoint). slirp maps every address inside its network to the host's loopback, so IMDS
# must stay outside it: then it is an ordinary remote address that slirp NATs to.
GUEST_NET = "168.63.129.0/24"
GUEST_DHCP_START = "168.63.129.100"
GUEST_SSH_PORT = 22

RESOURCE_DISK_SERIAL = "RESOURCEDISK"
RESOURCE_DISK_GUEST_PATH = f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{RESOURCE_DISK_SERIAL}"

# Microsoft's OUI, as on Azure NICs.
_AZURE_OUI = "00:0d:3a"
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

HYPERV_ENLIGHTENMENTS = (
    "hv-relaxed", "hv-vapic", "hv-spinlocks=0x1fff", "hv-vpindex", "hv-runtime", "hv-time",
    "hv-synic", "hv-stimer", "hv-frequencies",
)


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


def random_mac() -> str:
    """A MAC in Microsoft's OUI with random low bytes."""
    low = os.urandom(3)
    return _AZURE_OUI + ":" + ":".join(f"{b:02x}" for b in low)


def _escape(value: str | os.PathLike[str]) -> str:
    """QEMU option values escape a comma by doubling it."""
    return os.fspath(value).replace(",", ",,")


@dataclass(frozen=True)
class NetSpec:
    """The guest's NIC on QEMU user networking; ``ssh_port`` is where the namespace reaches its sshd."""

    mac: str = field(default_factory=random_mac)
    ssh_port: int = 2222
    hostname: str = ""

    def __post_init__(self) -> None:
        if not _MAC_RE.match(self.mac):
            raise InputError(f"bad MAC address {self.mac!r}; allowed: six lower-case hex pairs like 00:0d:3a:12:34:56")
        if int(self.mac[:2], 16) & 1:
            raise InputError(f"bad MAC address {self.mac!r}: a multicast address; allowed: a unicast MAC")
        if not 1024 <= self.ssh_port <= 65535:
            raise InputError(f"bad SSH forward port {self.ssh_port}; allowed: 1024 to 65535")
        if self.hostname and not _NAME_RE.match(self.hostname):
            raise InputError(f"bad hostname {self.hostname!r}; allowed: letters, digits, '.', '_', '-'")


MEMORY_MIB_MIN, MEMORY_MIB_MAX = 128, 1024 * 1024  # a VM's memory, as VMSpec and the tasks' --memory take it
CPUS_MAX = 64


@dataclass(frozen=True)
class VMSpec:
    """Everything that decides a VM's QEMU command line."""

    name: str
    accel: Accel
    console_log: Path
    qmp_socket: Path | None = None
    memory_mib: int = 1024
    cpus: int = 1
    vm_uuid: uuid.UUID = field(default_factory=uuid.uuid4)
    os_disk: Path | None = None
    os_disk_format: str = "qcow2"
    iso: Path | None = None
    resource_disk: Path | None = None
    net: NetSpec | None = None
    kernel: Path | None = None
    kernel_append: str = ""
    debug_exit: bool = False

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise InputError(f"bad VM name {self.name!r}; allowed: letters, digits, '.', '_', '-' (max 63)")
        if not MEMORY_MIB_MIN <= self.memory_mib <= MEMORY_MIB_MAX:
            raise InputError(f"bad memory size {self.memory_mib} MiB; allowed: {MEMORY_MIB_MIN} to {MEMORY_MIB_MAX}")
        if not 1 <= self.cpus <= CPUS_MAX:
            raise InputError(f"bad vCPU count {self.cpus}; allowed: 1 to {CPUS_MAX}")
        if self.os_disk_format not in ("qcow2", "raw"):
            raise InputError(f"bad OS disk format {self.os_disk_format!r}; allowed: qcow2, raw")
        if self.kernel_append and self.kernel is None:
            raise InputError("a kernel command line needs a kernel (VMSpec.kernel)")


def cpu_args(accel: Accel) -> list[str]:
    if accel is Accel.KVM:
        return ["-accel", "kvm", "-cpu", "host," + ",".join(HYPERV_ENLIGHTENMENTS)]
    # The TCG CPU would announce itself through the CPUID hypervisor leaf ("TCGTCGTCGTCG"); hiding the
    # bit leaves the SMBIOS identity as the only virtualization hint, which is what systemd then reports.
    return ["-accel", "tcg", "-cpu", "max,hypervisor=off"]


_SMP_RE = re.compile(r"^(\d+)")


def vcpus_of_running_vms(proc: Path = Path("/proc")) -> int:
    """How many vCPUs the imagekit VMs running on this host have (QEMU processes named ``process=ik-...``)."""
    total = 0
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if not os.path.basename(args[0]).startswith(b"qemu-system"):
            continue
        if not any(b"process=ik-" in a for a in args):
            continue
        smp = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == b"-smp"), b"1")
        m = _SMP_RE.match(smp.decode(errors="replace"))
        total += int(m.group(1)) if m else 1
    return total


def choose_cpus(host_cores: int | None = None, busy_vcpus: int | None = None) -> int:
    """The vCPU count for a new VM when none is asked for: ``$IMAGEKIT_CPUS`` if set (the test suite sets 1
    when it runs one VM per core), else two where two of the host's cores are free of other imagekit VMs
    (under TCG the two then run as two host threads, multi-threaded TCG), else one."""
    env = os.environ.get("IMAGEKIT_CPUS", "").strip()
    if env:
        if not env.isdigit() or not 1 <= int(env) <= CPUS_MAX:
            raise InputError(f"bad IMAGEKIT_CPUS {env[:20]!r}; allowed: a vCPU count from 1 to {CPUS_MAX} "
                             "(unset: chosen from the host's free cores)")
        return int(env)
    cores = host_cores if host_cores is not None else (os.cpu_count() or 1)
    busy = busy_vcpus if busy_vcpus is not None else vcpus_of_running_vms()
    return 2 if cores - busy >= 2 else 1


def build_argv(spec: VMSpec, qemu: str = QEMU_BINARY) -> list[str]:
    """The QEMU command line for ``spec`` (pure: reads no file, starts nothing)."""
    argv = [
        qemu,
        "-name", f"{spec.name},process=ik-{spec.name}",
        "-machine", "pc",
        *cpu_args(spec.accel),
        "-m", str(spec.memory_mib),
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-uuid", str(spec.vm_uuid),
        "-smbios",
        f"type=1,manufacturer={SMBIOS_MANUFACTURER},product={SMBIOS_PRODUCT},version={SMBIOS_VERSION},"
        f"uuid={spec.vm_uuid}",
        "-smbios", f"type=3,manufacturer={SMBIOS_MANUFACTURER},asset={AZURE_CHASSIS_ASSET_TAG}",
        "-chardev", f"file,id=console,path={_escape(spec.console_log)}",
        "-serial", "chardev:console",
        "-device", "pvpanic",
        # A panicked guest stays paused for inspection; the runner sees GUEST_PANICKED on QMP.
        "-action", "panic=pause",
    ]
    if spec.qmp_socket is not None:
        argv += [
            "-chardev", f"socket,id=qmp,path={_escape(spec.qmp_socket)},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]
    if spec.os_disk is not None or spec.resource_disk is not None:
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    if spec.os_disk is not None:
        argv += [
            "-drive", f"if=none,id=osdisk,file={_escape(spec.os_disk)},format={spec.os_disk_format},"
                      "discard=unmap,cache=writeback",
            "-device", "scsi-hd,drive=osdisk,bus=scsi0.0,channel=0,scsi-id=0,lun=0,bootindex=0",
        ]
    if spec.resource_disk is not None:
        argv += [
            "-drive", f"if=none,id=resdisk,file={_escape(spec.resource_disk)},format=raw,discard=unmap",
            "-device", f"scsi-hd,drive=resdisk,bus=scsi0.0,channel=0,scsi-id=0,lun=1,serial={RESOURCE_DISK_SERIAL}",
        ]
    if spec.iso is not None:
        argv += [
            "-drive", f"if=none,id=ovfiso,file={_escape(spec.iso)},format=raw,media=cdrom,readonly=on",
            "-device", "ide-cd,drive=ovfiso,bus=ide.1,unit=0",
        ]
    argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0"]
    if spec.net is not None:
        netdev = (
            f"user,id=n0,ipv6=off,net={GUEST_NET},host={WIRESERVER_IP},dhcpstart={GUEST_DHCP_START},"
            f"hostfwd=tcp:127.0.0.1:{spec.net.ssh_port}-:{GUEST_SSH_PORT}"
        )
        if spec.net.hostname:
            netdev += f",hostname={spec.net.hostname}"
        argv += ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={spec.net.mac}"]
    if spec.kernel is not None:
        argv += ["-kernel", os.fspath(spec.kernel)]
        if spec.kernel_append:
            argv += ["-append", spec.kernel_append]
    if spec.debug_exit:
        argv += ["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
    return argv


# --- the accelerator probe -------------------------------------------------------------------------

# scripts/kvm-probe.S assembled: enters long mode, prints PROBE_MARKER on COM1, exits QEMU with status 3.
PROBE_PAYLOAD = bytes.fromhex(
    "02b0ad1b00000100fe4f51e40000100000001000000000000000000020001000fabf0000200031c0b9000c0000f3abc7"
    "050000200003102000c7050010200003202000bf00202000b883000000b9000200008907c74704000000000500002000"
    "83c708e2ed0f20e083c8200f22e0b8000020000f22d8b9800000c00f320d000100000f300f20c00d010000800f22c00f"
    "0115e0001000ea9d001000080066b810008ed88ed0488d353a00000066baf803ac84c07403eeebf866baf400b8010000"
    "00eff4ebfd0f1f000000000000000000ffff0000009aaf00ffff00000092cf001700c8001000494d4147454b49542d4c"
    "4f4e472d4d4f44452d4f4b0a00"
)
PROBE_MARKER = b"IMAGEKIT-LONG-MODE-OK"
PROBE_EXIT_STATUS = 3
PROBE_TIMEOUT = 15.0
_PROBE_CACHE_FILE = "accel-probe.json"


@dataclass(frozen=True)
class ProbeResult:
    accel: Accel
    reason: str
    cached: bool = False


def _host_key(qemu: str) -> str:
    """What the probe's verdict depends on: the host kernel, the CPU, the QEMU build and /dev/kvm."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                cpu += line
            if line.startswith("flags"):
                break
    qemu_path = shutil.which(qemu) or qemu
    try:
        st = os.stat(qemu_path)
        qemu_id = f"{qemu_path}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        qemu_id = qemu_path
    kvm = "present" if os.path.exists("/dev/kvm") else "absent"
    parts = [socket.gethostname(), os.uname().release, cpu, qemu_id, kvm, PROBE_PAYLOAD.hex()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _run_probe(qemu: str, timeout: float) -> tuple[bool, str]:
    """Boot the payload under KVM; True only if it printed the marker and exited as designed."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    with tempfile.TemporaryDirectory(prefix="ik-kvm-probe-") as tmp:
        payload = Path(tmp) / "probe.bin"
        payload.write_bytes(PROBE_PAYLOAD)
        console = Path(tmp) / "console.log"
        spec = VMSpec(name="kvm-probe", accel=Accel.KVM, console_log=console, memory_mib=128,
                      kernel=payload, debug_exit=True)
        argv = build_argv(spec, qemu)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError as exc:
            raise HostError(f"{qemu} not found", hint="run ./ik setup (installs qemu-system-x86)") from exc
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False, f"a KVM guest did not finish a {len(PROBE_PAYLOAD)}-byte boot test within {timeout:.0f} s"
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out = console.read_bytes() if console.exists() else b""
        if PROBE_MARKER in out and proc.returncode == PROBE_EXIT_STATUS:
            return True, "a KVM guest ran the long-mode boot test"
        detail = err.decode(errors="replace").strip().splitlines()
        first_error = next((ln for ln in detail if "error" in ln.lower()), detail[-1] if detail else "")
        return False, f"the KVM boot test failed (exit {proc.returncode}{': ' + first_error if first_error else ''})"


def probe_accel(*, qemu: str = QEMU_BINARY, use_cache: bool = True, timeout: float = PROBE_TIMEOUT) -> ProbeResult:
    """KVM if a guest really runs under it on this host, else TCG (with a one-line warning).

    ``IMAGEKIT_ACCEL=kvm|tcg`` overrides the probe. The verdict is cached per host (kernel, CPU, QEMU
    build) in ``cache_dir()/accel-probe.json``; the probe itself never takes longer than ``timeout``.
    """
    forced = os.environ.get("IMAGEKIT_ACCEL", "").strip().lower()
    if forced:
        try:
            return ProbeResult(Accel(forced), "set by IMAGEKIT_ACCEL")
        except ValueError:
            raise InputError(f"IMAGEKIT_ACCEL={forced!r}; allowed: kvm, tcg") from None
    key = _host_key(qemu)
    cache_file = cache_dir() / _PROBE_CACHE_FILE
    result: ProbeResult | None = None
    if use_cache:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            entry = json.loads(cache_file.read_text())[key]
            result = ProbeResult(Accel(entry["accel"]), str(entry["reason"]), cached=True)
    if result is None:
        start = time.monotonic()
        ok, reason = _run_probe(qemu, timeout)
        result = ProbeResult(Accel.KVM if ok else Accel.TCG, reason)
        log.debug("accelerator probe took %.1f s: %s", time.monotonic() - start, reason)
        _store_probe(cache_file, key, result)
    if result.accel is Accel.TCG:
        log.warning("KVM is not usable here (%s); using TCG emulation, which is much slower", result.reason)
    return result


def _store_probe(cache_file: Path, key: str, result: ProbeResult) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(cache_file.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = {"accel": result.accel.value, "reason": result.reason, "probed_at": int(time.time())}
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".accel-probe-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, cache_file)
    except OSError as exc:
        log.debug("could not cache the accelerator probe in %s: %s", cache_file, exc)
