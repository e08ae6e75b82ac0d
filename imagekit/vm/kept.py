"""VMs left running on purpose (``provision --keep``, ``check --keep``): list them, stop them.

A kept VM's private directory (under the cache's ``vms/``) holds ``kept.json``: its name, the processes
that make it up (the namespace child with QEMU inside, and the fabric keeper), each with its start time so
that a reused pid is never taken for the VM, and how to log in. :func:`stop` ends those processes and
removes the directory with the secrets in it (the OVF ISO, the SSH key). A kept VM that ended by itself
(powered off inside, killed) is reported as ended, and :func:`imagekit.vm.runner.sweep_stale` removes its
directory the next time a VM starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imagekit.core.errors import InputError
from imagekit.core.fsutil import write_text_atomic
from imagekit.core.paths import vms_dir
from imagekit.fabric.keeper import process_start

__all__ = ["KEPT_FILE", "KeptVM", "Proc", "ended", "find", "list_kept", "process_start", "record", "stop", "vms_dir"]

KEPT_FILE = "kept.json"


@dataclass(frozen=True)
class Proc:
    """A process of a kept VM: its pid and start time (None when it was not known)."""

    pid: int
    start: str | None

    @classmethod
    def of(cls, pid: int) -> Proc:
        return cls(pid, process_start(pid))

    def alive(self) -> bool:
        return self.start is not None and process_start(self.pid) == self.start


@dataclass(frozen=True)
class KeptVM:
    name: str
    distro: str
    private_dir: Path
    run_dir: Path
    ssh_command: str
    kept_at: str
    child: Proc
    qemu: Proc | None
    keeper: Proc | None

    @property
    def running(self) -> bool:
        return self.child.alive()

    def processes(self) -> list[Proc]:
        return [p for p in (self.child, self.qemu, self.keeper) if p is not None]


def record(private_dir: Path, *, name: str, distro: str, run_dir: Path, ssh_command: str, child_pid: int,
           qemu_pid: int | None, keeper_pid: int | None) -> Path:
    """Write ``kept.json`` into a kept VM's private directory (0600: it names the key file's path)."""
    doc: dict[str, Any] = {
        "name": name, "distro": distro, "run_dir": os.fspath(run_dir), "ssh_command": ssh_command,
        "kept_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "child": asdict(Proc.of(child_pid)),
        "qemu": asdict(Proc.of(qemu_pid)) if qemu_pid else None,
        "keeper": asdict(Proc.of(keeper_pid)) if keeper_pid else None,
    }
    path = private_dir / KEPT_FILE
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n", mode=0o600)
    return path


def _load(path: Path) -> KeptVM | None:
    try:
        doc = json.loads(path.read_text())
        return KeptVM(
            name=str(doc["name"]), distro=str(doc["distro"]), private_dir=path.parent,
            run_dir=Path(doc["run_dir"]), ssh_command=str(doc["ssh_command"]), kept_at=str(doc["kept_at"]),
            child=Proc(**doc["child"]),
            qemu=Proc(**doc["qemu"]) if doc.get("qemu") else None,
            keeper=Proc(**doc["keeper"]) if doc.get("keeper") else None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # being written, or not ours: not listed


def list_kept(base: Path | None = None) -> list[KeptVM]:
    """Every kept VM with a record, running or ended, oldest first."""
    base = base or vms_dir()
    found = [vm for p in sorted(base.glob(f"*/{KEPT_FILE}")) if (vm := _load(p)) is not None]
    return sorted(found, key=lambda vm: (vm.kept_at, vm.name))


def find(name: str, base: Path | None = None) -> KeptVM:
    kept = list_kept(base)
    for vm in kept:
        if vm.name == name:
            return vm
    allowed = ", ".join(vm.name for vm in kept) or "none (no VM is kept)"
    raise InputError(f"no kept VM named {name!r}", hint=f"kept VMs: {allowed}")


def _signal(proc: Proc, sig: signal.Signals, *, group: bool = False) -> None:
    if not proc.alive():
        return  # gone, or the pid now belongs to another process: never signal that one
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group and os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)


def _wait_gone(procs: list[Proc], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(p.alive() for p in procs):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop(vm: KeptVM, timeout: float = 30.0) -> None:
    """End a kept VM, then remove its private directory (the secrets in it go with it).

    SIGTERM to the namespace child's process group (QEMU is in it), SIGKILL after ``timeout``; the fabric
    keeper ends by itself once the VM has (it polls every second), else it is sent SIGTERM too. A pid whose
    start time no longer matches the record belongs to another process now and is never signalled."""
    vm_procs = [p for p in (vm.child, vm.qemu) if p is not None]
    _signal(vm.child, signal.SIGTERM, group=True)
    if vm.qemu is not None:
        _signal(vm.qemu, signal.SIGTERM)
    if not _wait_gone(vm_procs, timeout):
        for p in vm_procs:
            _signal(p, signal.SIGKILL, group=p is vm.child)
        _wait_gone(vm_procs, 10)
    if vm.keeper is not None and not _wait_gone([vm.keeper], 5):
        _signal(vm.keeper, signal.SIGTERM)
        if not _wait_gone([vm.keeper], 10):
            _signal(vm.keeper, signal.SIGKILL)
            _wait_gone([vm.keeper], 5)
    shutil.rmtree(vm.private_dir, ignore_errors=True)


def ended(private_dir: Path) -> bool:
    """Whether ``private_dir`` belongs to a kept VM that has ended (for the sweep)."""
    vm = _load(private_dir / KEPT_FILE)
    return vm is not None and not any(p.alive() for p in vm.processes())
