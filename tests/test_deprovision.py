"""Deprovisioning's step runner: one root script, exit codes and claims parsed back; the plan per distro."""

from __future__ import annotations

import subprocess

import pytest

from imagekit.config import distros
from imagekit.core.errors import BuildError
from imagekit.generalize.deprovision import Claim, Step, deprovision, parse_output, plan, render_script
from imagekit.vm.guest import CommandResult


class ShellGuest:
    """Runs commands with the host's /bin/sh: enough to test script rendering and parsing (not a VM)."""

    def __init__(self, fail_prefix: tuple[str, ...] = ()) -> None:
        self.commands: list[str] = []
        self.fail_prefix = fail_prefix

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        self.commands.append(command)
        if command.startswith(self.fail_prefix) and self.fail_prefix:
            return CommandResult(command, 1, "", "")
        p = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout)
        return CommandResult(command, p.returncode, p.stdout, p.stderr)


def _run(steps: list[Step]) -> list:  # type: ignore[type-arg]
    text = subprocess.run(["sh", "-c", render_script(steps, "tok")], capture_output=True, text=True).stdout
    return parse_output(steps, text, "tok")


def test_exit_codes_claims_and_output_are_parsed() -> None:
    steps = [
        Step("a", "echo hello; echo world >&2", "t", (Claim("true holds", "true"), Claim("false holds", "false"))),
        Step("b", "exit 3", "t"),
        Step("c", "echo never", "t"),
    ]
    res = _run(steps)
    assert res[0].returncode == 0 and "hello" in res[0].output and "world" in res[0].output
    assert [(c.what, c.ok) for c in res[0].claims] == [("true holds", True), ("false holds", False)]
    assert not res[0].ok
    assert res[1].returncode == 3 and not res[1].ok
    assert res[2].returncode is None  # stopped after a failed step
    assert "never" not in res[2].output


def test_plan_for_debian_12_has_the_table_steps_and_their_claims() -> None:
    steps = plan(distros.get("debian-12"), "ikbuild1")
    assert steps[0].command == "waagent -force -deprovision+user"
    whats = " | ".join(c.what for c in steps[0].claims)
    for expected in ("user ikbuild1 is gone", "/home/ikbuild1 is gone", "/var/lib/waagent is gone",
                     "SSH host keys are gone", "DHCP leases"):
        assert expected in whats
    assert any("machine-id" in s.name for s in steps)


def test_plan_for_cloud_init_cleans_cloud_init_first() -> None:
    steps = plan(distros.get("debian-12-cloudinit"), "ikbuild1")
    assert steps[0].command.startswith("cloud-init clean")
    assert any("instance state" in c.what for c in steps[0].claims)
    assert any("logs are gone" in c.what for c in steps[0].claims)
    assert steps[1].command == "waagent -force -deprovision+user"


def test_bad_username_refused() -> None:
    with pytest.raises(BuildError, match="not a valid user name"):
        plan(distros.get("debian-12"), "x; rm -rf /")


def test_missing_preconditions_fail_before_anything_runs() -> None:
    guest = ShellGuest(fail_prefix=("getent", "test"))
    with pytest.raises(BuildError, match="expected before the first step"):
        deprovision(guest, distros.get("debian-12"), "ikbuild1")
    assert not any("waagent -force" in c for c in guest.commands)


@pytest.mark.parametrize("distro", ["debian-12", "debian-12-cloudinit", "debian-13", "debian-13-cloudinit"])
def test_rendered_plan_is_valid_shell(distro: str) -> None:
    script = render_script(plan(distros.get(distro), "ikbuild1"), "tok")
    res = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # the unit file text reaches the guest intact (heredoc inside the step's subshell)
    assert "rm -rf /var/lib/dhcp/* /var/lib/dhclient/*" in script and "Wants=network-pre.target" in script
