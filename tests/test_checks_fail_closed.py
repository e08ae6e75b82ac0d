"""Checks fail closed: whatever check is in the catalogue (today's and any added later), a probe that did
not work — a non-zero exit with an error on stderr, a refused sudo, no output at all, a guest that does not
answer in time — makes it an ``error`` whose evidence names the command and carries its stderr. Never a
pass, a fail or a skip: the check learned nothing.

The failing guest here answers every command the same way, so no scenario needs to know a check's
command strings; the catalogue is read from the registry when the tests are collected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from imagekit.checks import Check, CheckContext, HealthReport, RecordedFabric, Status, catalogue, plan_for, run_checks
from imagekit.checks.registry import PROBE_OK, ProbeFailed
from imagekit.config import distros
from imagekit.config.profile import ProvisioningProfile
from imagekit.core.errors import VMError
from imagekit.vm.guest import CommandResult

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGVxYW1wbGVrZXlmb3J0ZXN0c29ubHkxMjM0NTY3ODkw imagekit-test"
PROFILE = ProvisioningProfile(hostname="ikvm", username="azureuser", ssh_public_keys=(KEY,))
READY = RecordedFabric((HealthReport("Ready", seconds=20.0),))
# Checks that read only what the fabric emulator recorded, never the guest (written out here, so a new
# check that runs no guest command has to be named on purpose).
FABRIC_ONLY = {"provisioning.ready-reported"}


@dataclass
class FailingGuest:
    """Every command fails the same way (exit code, stdout, stderr), or does not finish in time."""

    returncode: int = 1
    stdout: str = ""
    stderr: str = ""
    timeout: bool = False
    calls: list[str] = field(default_factory=list)
    runs_batches: bool = False  # True: the checks' probes come as batch scripts first (which fail the same way)

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        self.calls.append(command)
        if self.timeout:
            raise VMError(f"SSH to test-vm: command did not finish within {timeout:.0f} s: {command[:200]}")
        return CommandResult(command, self.returncode, self.stdout, self.stderr)


MODES: dict[str, tuple[Callable[[], FailingGuest], str | None]] = {
    "exit 1 with an error": (lambda: FailingGuest(1, "", "cat: /etc/x: Input/output error\n"),
                             "Input/output error"),
    "sudo refused": (lambda: FailingGuest(1, "", "sudo: a password is required\n"), "sudo: a password is required"),
    "exit 0, no output": (lambda: FailingGuest(0, "", ""), None),
    "exit 0, only whitespace": (lambda: FailingGuest(0, "\n  \n", ""), None),
    "timeout": (lambda: FailingGuest(timeout=True), "did not finish within"),
}


def _distro_for(c: Check) -> distros.Distro:
    """A distro the check applies to (the Debian 12 entries first: the ones the VM tests build)."""
    table = distros.default_table()
    order = ["debian-12", "debian-12-cloudinit", *sorted(table)]
    for did in order:
        if c.skip_reason(table[did]) is None:
            return table[did]
    raise AssertionError(f"{c.id} applies to no distro in the table")


CHECKS = sorted(catalogue())


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("check_id", CHECKS)
def test_a_failing_probe_makes_every_check_an_error(check_id: str, mode: str, batched: bool) -> None:
    c = catalogue()[check_id]
    d = _distro_for(c)
    make, stderr_text = MODES[mode]
    guest = make()
    guest.runs_batches = batched
    ctx = CheckContext(guest=guest, distro=d, profile=PROFILE, fabric=READY, plan=plan_for(d))
    result = run_checks(ctx, [c])[0].result if batched else c.run(ctx)
    if not guest.calls:
        assert check_id in FABRIC_ONLY, f"{check_id} ran no guest command: name it in FABRIC_ONLY if that is right"
        return
    assert result.status is Status.ERROR, (check_id, d.id, result.status, result.summary, result.evidence[:400])
    # The evidence names the probe that failed, as the guest ran it, and carries what it printed on stderr.
    assert any(f"$ {cmd}" in result.evidence for cmd in guest.calls), result.evidence[:600]
    if stderr_text:
        assert stderr_text in result.evidence + result.summary, result.evidence[:600]
    assert not result.summary.startswith("check crashed"), "a failed probe is reported as such, not as a crash"


def test_the_fabric_only_checks_exist() -> None:
    assert set(catalogue()) >= FABRIC_ONLY


# --- the probe rules themselves ---------------------------------------------------------------------------


class OneAnswer:
    def __init__(self, rc: int, out: str, err: str = "") -> None:
        self.answer = (rc, out, err)

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        return CommandResult(command, *self.answer)


def _ctx(rc: int, out: str, err: str = "") -> CheckContext:
    d = distros.get("debian-12")
    return CheckContext(guest=OneAnswer(rc, out, err), distro=d, profile=PROFILE)


def test_probe_returns_the_result_only_when_it_worked() -> None:
    assert _ctx(0, "x\n").probe("p").stdout == "x\n"
    assert _ctx(2, "").probe("p", ok=(0, 2)).returncode == 2  # an allowed "not found" answer
    with pytest.raises(ProbeFailed, match="exited 1"):
        _ctx(1, "half an answer\n", "boom").probe("p")
    with pytest.raises(ProbeFailed, match="exited 3"):
        _ctx(3, "", "").probe("p", ok=(0, 2))
    with pytest.raises(ProbeFailed, match="printed nothing"):
        _ctx(0, " \n").probe("p")
    assert _ctx(0, "").probe("p", output=False).stdout == ""


def test_a_marker_probe_must_end_with_its_marker() -> None:
    res = _ctx(0, f"a\nb\n{PROBE_OK}\n").probe("p", marker=True)
    assert res.stdout == "a\nb\n"
    assert _ctx(0, f"{PROBE_OK}\n").probe("p", marker=True).stdout == ""  # ran, found nothing
    for out in ("", "a\n", f"{PROBE_OK}\nmore output after the marker\n"):
        with pytest.raises(ProbeFailed, match="closing marker"):
            _ctx(0, out).probe("p", marker=True)


def test_probe_failure_evidence_has_the_command_exit_code_and_stderr_tail() -> None:
    err = "".join(f"line {i}\n" for i in range(100)) + "the last error\n"
    with pytest.raises(ProbeFailed) as exc:
        _ctx(1, "", err).probe("cat /etc/shadow")
    ev = exc.value.evidence()
    assert ev.startswith("$ cat /etc/shadow\n")
    assert "[exit code 1]" in ev and "the last error" in ev
    assert "line 10\n" not in ev, "only the tail of stderr"
