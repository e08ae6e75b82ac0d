"""The VM runner's lifecycle with real QEMU (TCG) and no disk: the probe payload is the guest.

The payload (``scripts/kvm-probe.S``) enters long mode, prints a marker on COM1 and halts, which is all
these tests need: console output, a running QEMU to control over QMP, to kill, and to clean up after.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from imagekit.core.errors import VMError
from imagekit.vm import qemu
from imagekit.vm.runner import VM, GuestNetwork

pytestmark = pytest.mark.vm

MARKER = qemu.PROBE_MARKER.decode()


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    p = tmp_path / "payload.bin"
    p.write_bytes(qemu.PROBE_PAYLOAD)
    return p


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(")")[1].split()[0] != "Z"


def _vm(tmp_path: Path, payload: Path, **kw: object) -> VM:
    return VM("t-" + os.urandom(3).hex(), run_dir=tmp_path / "run", kernel=payload, memory_mib=128,
              accel=qemu.Accel.TCG, powerdown_timeout=1, **kw)  # type: ignore[arg-type]


def test_lifecycle_and_cleanup(tmp_path: Path, payload: Path) -> None:
    with _vm(tmp_path, payload, network=GuestNetwork()) as vm:
        assert vm.status() == "running"
        vm.wait_console(MARKER, timeout=60, what="the payload's marker")
        private, pid, child = vm.private_dir, vm.qemu_pid, vm.child_pid
        assert private.is_dir() and (private / "qmp.sock").exists() and vm.ssh_socket and vm.ssh_socket.exists()
        assert _alive(pid) and _alive(child)
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        t = vm.timings.as_dict()
        assert "qemu start" in t and "first console output" in t
    # The payload ignores ACPI: the polite power-down times out, then quit ends QEMU.
    assert not _alive(pid) and not _alive(child)
    assert not private.exists()
    assert MARKER in (tmp_path / "run" / "console.log").read_text()


def test_qemu_killed_mid_run_is_a_clean_error(tmp_path: Path, payload: Path) -> None:
    with pytest.raises(VMError) as err, _vm(tmp_path, payload) as vm:
        vm.wait_console(MARKER, timeout=60, what="the payload's marker")
        private, pid = vm.private_dir, vm.qemu_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # Wait on something that never happens: the check between slices must notice the dead QEMU.
        vm.wait_until(lambda t: vm._stop_watch.wait(t), timeout=60, what="nothing (QEMU was killed)")
    msg = str(err.value)
    assert "QEMU exited unexpectedly (killed by signal 9)" in msg
    assert MARKER in err.value.console_tail
    assert not _alive(pid)
    assert not private.exists()


def test_guest_panic_is_an_error_with_the_console(tmp_path: Path) -> None:
    # The same payload, but its final write goes to the pvpanic port (0x505) instead of isa-debug-exit.
    panicking = qemu.PROBE_PAYLOAD.replace(b"\x66\xba\xf4\x00", b"\x66\xba\x05\x05")
    assert panicking != qemu.PROBE_PAYLOAD
    p = tmp_path / "panic.bin"
    p.write_bytes(panicking)
    with pytest.raises(VMError, match="panicked") as err, _vm(tmp_path, p) as vm:
        vm.wait_until(lambda t: vm._stop_watch.wait(t), timeout=120, what="a panic")
    assert MARKER in err.value.console_tail
    assert not _alive(vm.qemu_pid)


def test_ctrl_c_cleans_up(tmp_path: Path, payload: Path) -> None:
    with pytest.raises(KeyboardInterrupt), _vm(tmp_path, payload, network=GuestNetwork()) as vm:
        private, pid, child = vm.private_dir, vm.qemu_pid, vm.child_pid
        raise KeyboardInterrupt
    assert not _alive(pid) and not _alive(child)
    assert not private.exists()


def test_start_failure_carries_qemu_stderr(tmp_path: Path) -> None:
    with pytest.raises(VMError, match="QEMU") as err, \
            VM("t-bad", run_dir=tmp_path / "run", kernel=tmp_path / "missing.bin", memory_mib=128,
               accel=qemu.Accel.TCG):
        pass
    assert "missing.bin" in str(err.value)
    leftover = subprocess.run(["pgrep", "-f", "process=ik-t-bad"], capture_output=True, text=True).stdout
    assert leftover.strip() == ""


def test_boot_milestones_are_found_as_console_output_arrives_even_when_a_line_is_split() -> None:
    from imagekit.vm.runner import MilestoneWatch

    w = MilestoneWatch()
    assert w.feed(b"SeaBIOS (version 1.16)\r\n") == []
    assert w.feed(b"Welcome to GRUB!\r\n") == ["boot loader"]  # and not "userspace started"
    assert w.feed(b"[    0.000000] Linux vers") == []
    assert w.feed(b"ion 6.1.0-28-amd64 (debian-kernel@lists.debian.org)\r\n") == ["kernel started"]
    assert w.feed(b"[    6.09] Run /init as init process\r\n[   19.36] systemd[1]: systemd 252.39 running\r\n") == [
        "initrd started", "userspace started"]
    assert w.feed(b"Welcome to Debian GNU/Linux 12 (bookworm)!\r\n") == []  # each milestone once
    assert w.feed(b"2026-12-02T00:26:39Z INFO Daemon Daemon Azure Linux Agent Version:2.7.3.0\r\n") == ["agent started"]
    assert w.feed(b"Debian GNU/Linux 12 ik-7407b5 ttyS0\r\n\r\nik-7407b5 login: ") == ["login prompt"]
    assert w.pending == []
