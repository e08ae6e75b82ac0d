"""Waiting for Ready in slices (so a dead QEMU is noticed within a second) still reports the whole wait:
a build whose agent never reported Ready said "did not report Ready within 0 s" after 15 minutes."""

from __future__ import annotations

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
