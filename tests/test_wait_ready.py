"""Waiting for Ready in slices (so a dead QEMU is noticed within a second) still reports the whole wait:
a build whose agent never reported Ready said "did not report Ready within 0 s" after 15 minutes."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagekit.core.errors import ProvisioningError
from imagekit.fabric.state import FabricState
from imagekit.provision.launch import _wait_ready


class _VM:
    name = "t-vm"
    console_log = "/nonexistent/console.log"

    def check(self) -> None:
        pass

    def console_tail(self) -> str:
        return ""


class _Fabric:
    def __init__(self) -> None:
        self.state = FabricState()

    def wait_for_ready(self, timeout: float):  # type: ignore[no-untyped-def]
        return self.state.wait_for_ready(timeout)


def test_a_ready_timeout_names_the_whole_wait_not_its_last_slice() -> None:
    with pytest.raises(ProvisioningError) as info:
        _wait_ready(_VM(), _Fabric(), 1.5)  # type: ignore[arg-type]
    msg = info.value.message
    assert "VM t-vm: the guest agent did not report Ready within 1.5 s: 0 request(s) received" in msg
    assert "within 0 s" not in msg


# What waagent 2.2.47 (Debian 11's package, on Python 3.9) writes to the console on every daemon start: the
# UnhandledError event with its traceback, then the restart line (from a real build's console log).
CRASH = """\
2026-12-02T14:09:01.875405Z ERROR Daemon Daemon Event: name=WALinuxAgent, op=UnhandledError, \
message=Traceback (most recent call last):
  File "/usr/lib/python3/dist-packages/azurelinuxagent/common/osutil/default.py", line 804, in _get_all_interfaces
    ifconf_buff = buff.tostring()
AttributeError: 'array.array' object has no attribute 'tostring'
, duration=0
2026-12-02T14:09:01.927286Z WARNING Daemon Daemon Daemon ended with exception -- Sleep 15 seconds and restart daemon
2026-12-02T14:09:16.954820Z INFO Daemon Daemon Run daemon
"""
OTHER = CRASH.replace("AttributeError: 'array.array' object has no attribute 'tostring'",
                      "OSError: [Errno 101] Network is unreachable")


def test_the_same_exception_three_restarts_in_a_row_is_a_crash_loop() -> None:
    from imagekit.provision.launch import agent_crash_loop

    assert agent_crash_loop(CRASH * 2) is None
    assert agent_crash_loop(CRASH * 3) == "AttributeError: 'array.array' object has no attribute 'tostring'"
    assert agent_crash_loop(OTHER + CRASH * 2) is None  # not the same three times
    assert agent_crash_loop(OTHER + CRASH * 3) is not None
    assert agent_crash_loop(CRASH * 3 + OTHER) is None  # the last three restarts decide
    # Restart lines with no exception before them (nothing to judge) are not a diagnosis.
    bare = "\n".join(ln for ln in CRASH.splitlines() if "Error" not in ln) + "\n"
    assert agent_crash_loop(bare * 4) is None


def test_a_crash_loop_on_the_console_ends_the_wait_with_the_agents_exception(tmp_path: Path) -> None:
    import imagekit.provision.launch as launch

    console = tmp_path / "console.log"
    console.write_text(CRASH * 3)
    vm = _VM()
    vm.console_log = console  # type: ignore[assignment]
    with pytest.raises(ProvisioningError) as info:  # the diagnosis, not the timeout, ends the wait
        launch._wait_ready(vm, _Fabric(), 60, watch_crashes=True)  # type: ignore[arg-type]
    assert "waagent's daemon keeps crashing" in info.value.message
    assert "AttributeError: 'array.array' object has no attribute 'tostring'" in info.value.message
