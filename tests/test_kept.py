"""Kept VMs (``--keep``): the record, listing, stopping, and the sweep of ended ones.

The "VM" here is a stand-in: a session leader with a child (as the namespace child with QEMU inside) and
a separate process as the fabric keeper; the VM test in test_provision_vm.py stops a real one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagekit.core.errors import InputError
from imagekit.vm import kept
from imagekit.vm.runner import sweep_stale


def _spawn(*, session: bool) -> subprocess.Popen[bytes]:
    # a shell that starts a child of its own: "QEMU" inside the namespace child's process group
    return subprocess.Popen(["sh", "-c", "sleep 600 & wait"], start_new_session=session)


def _gone(pid: int) -> bool:
    return kept.process_start(pid) is None


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMAGEKIT_CACHE", str(tmp_path / "cache"))
    d = kept.vms_dir()
    d.mkdir(parents=True)
    return d


class FakeKept:
    def __init__(self, base: Path, name: str) -> None:
        self.private = base / f"{name}-abc123"
        self.private.mkdir(mode=0o700)
        (self.private / ".owner").write_text("999999999")  # a harness long gone, as after --keep
        (self.private / "netns.json").write_text(json.dumps({"detach": True}))
        (self.private / "ovf.iso").write_bytes(b"secret")
        self.child = _spawn(session=True)
        self.keeper = _spawn(session=True)
        time.sleep(0.2)  # let the shell start its sleep
        self.qemu_pid = int(subprocess.run(["pgrep", "-P", str(self.child.pid)], capture_output=True,
                                           text=True).stdout.split()[0])
        kept.record(self.private, name=name, distro="debian-12", run_dir=base / "run", ssh_command="ssh x@y",
                    child_pid=self.child.pid, qemu_pid=self.qemu_pid, keeper_pid=self.keeper.pid)

    def close(self) -> None:
        for p in (self.child, self.keeper):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture
def vm(base: Path) -> Iterator[FakeKept]:
    f = FakeKept(base, "debian-12-kept1")
    try:
        yield f
    finally:
        f.close()


def test_record_is_private_and_listed_as_running(base: Path, vm: FakeKept) -> None:
    rec = vm.private / kept.KEPT_FILE
    assert rec.stat().st_mode & 0o777 == 0o600
    [listed] = kept.list_kept()
    assert (listed.name, listed.distro, listed.ssh_command, listed.running) == ("debian-12-kept1", "debian-12",
                                                                                 "ssh x@y", True)
    assert listed.qemu is not None and listed.qemu.pid == vm.qemu_pid
    # Another harness starting a VM sweeps stale dirs: a running kept VM is not one of them.
    assert sweep_stale(base) == [] and vm.private.exists()


def test_stop_ends_every_process_and_removes_the_secrets(base: Path, vm: FakeKept) -> None:
    kept.stop(kept.find("debian-12-kept1"), timeout=10)
    vm.child.wait(10)
    vm.keeper.wait(10)
    assert _gone(vm.qemu_pid), "QEMU (in the namespace child's group) outlived vm-stop"
    assert not vm.private.exists()
    assert kept.list_kept() == []


def test_a_vm_that_ended_is_listed_as_ended_and_swept(base: Path, vm: FakeKept) -> None:
    for p in (vm.child, vm.keeper):
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    deadline = time.monotonic() + 10
    while not _gone(vm.qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    [listed] = kept.list_kept()
    assert not listed.running
    assert sweep_stale(base) == [vm.private] and not vm.private.exists()


def test_a_reused_pid_is_never_signalled(base: Path, vm: FakeKept) -> None:
    """The record pairs each pid with its start time: a different process under that pid is left alone."""
    rec = vm.private / kept.KEPT_FILE
    doc = json.loads(rec.read_text())
    # As if the VM's child and QEMU had ended and their pids been given to these processes.
    doc["child"]["start"] = doc["qemu"]["start"] = "1"
    rec.write_text(json.dumps(doc))
    listed = kept.find("debian-12-kept1")
    assert not listed.running
    kept.stop(listed, timeout=2)
    assert vm.child.poll() is None and not _gone(vm.qemu_pid), "a process that is not the VM's was killed"
    assert vm.keeper.wait(10) == -signal.SIGTERM  # the keeper's record was right: it was stopped
    assert not vm.private.exists()


def test_unknown_name_names_the_kept_ones(base: Path, vm: FakeKept) -> None:
    with pytest.raises(InputError) as err:
        kept.find("nope")
    assert "nope" in str(err.value) and "debian-12-kept1" in str(err.value)


def test_vm_stop_task_needs_one_target() -> None:
    out = subprocess.run([sys.executable, "-m", "invoke", "vm-stop"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 1 and "exactly one of --name NAME or --all" in out.stderr
