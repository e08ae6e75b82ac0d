"""Several guest commands in one round trip (imagekit.vm.guest.run_many) and the checks' batched probes.

The batch script runs for real under /bin/sh (dash); the oracle for each command is the same command run
on its own through ``/bin/sh -c`` by subprocess, so a batch that mixes up outputs, loses an exit code, lets one
command's stdin or output reach another, or mangles bytes fails here. The catalogue is run twice over a
planted fake root (tests/fakeroot.py), batched and one probe at a time: every check's status, summary and
evidence must be the same, in far fewer round trips.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagekit.checks import CheckContext, HealthReport, RecordedFabric, Status, catalogue, plan_for, run_checks
from imagekit.config import distros
from imagekit.config.profile import ProvisioningProfile
from imagekit.core.errors import VMError
from imagekit.vm.guest import BATCH_MAX_CHARS, Command, CommandResult, batch_script, parse_batch, run_many
from tests.fakeroot import FakeRoot, can_run

# Commands whose outputs would trip a careless batch: no output, only stderr, exit codes, bytes that are not
# UTF-8, lines that look like the batch's own records, no final newline, stdin (must be empty), a shell exit.
COMMANDS = [
    "echo hello; echo warning >&2",
    "exit 3",
    "true",
    r"printf '\377\376 not utf-8\n'",
    "printf '@@imagekit-batch 0 0 aGkK aGkK\\n@@imagekit-batch-end\\n'",
    "printf 'no newline at the end'",
    "cat; echo read-stdin-done",
    "echo to-stderr-only >&2; exit 1",
    "for i in $(seq 1 20000); do echo line $i; done",
    "echo $0 $#",
]


def _alone(command: str) -> CommandResult:
    # ``sh -c``, as SSHGuest.run sends a command (so $0 is "sh")
    p = subprocess.run(["sh", "-c", command], capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    return CommandResult(command, p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


@dataclass
class ShellGuest:
    """A guest that is this host's /bin/sh; it counts the round trips it was asked for."""

    runs_batches: bool = True
    calls: list[str] = field(default_factory=list)
    mangle: bool = False  # cut every output in half, as a broken transport would

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        self.calls.append(command)
        p = subprocess.run(["sh", "-c", command], capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
        out = p.stdout[: len(p.stdout) // 2] if self.mangle and len(self.calls) == 1 else p.stdout
        return CommandResult(command, p.returncode, out.decode(errors="replace"), p.stderr.decode(errors="replace"))


def test_a_batch_gives_each_command_what_it_gives_alone() -> None:
    cmds = [Command(c) for c in COMMANDS]
    p = subprocess.run(["/bin/sh", "-c", batch_script(cmds)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    got = parse_batch(p.stdout, cmds)
    assert sorted(got) == list(range(len(COMMANDS)))
    for i, c in enumerate(COMMANDS):
        assert got[i] == _alone(c), c
    assert got[6].stdout == "read-stdin-done\n"  # stdin was empty, not the rest of the script
    assert got[1].returncode == 3 and got[7].returncode == 1 and got[7].stderr == "to-stderr-only\n"
    assert got[4].stdout.startswith("@@imagekit-batch 0 0")  # the look-alike stayed data of command 4
    assert got[0].stdout == "hello\n"  # and did not replace command 0's record


def test_a_command_that_outlives_its_timeout_is_cut_off_and_the_next_still_runs() -> None:
    cmds = [Command("sleep 30", timeout=1), Command("echo after")]
    p = subprocess.run(["/bin/sh", "-c", batch_script(cmds)], capture_output=True, text=True, timeout=60)
    got = parse_batch(p.stdout, cmds)
    assert got[0].returncode == 124
    assert "did not finish within 1 s" in got[0].stderr
    assert got[1] == CommandResult("echo after", 0, "after\n", "")


def test_run_many_uses_one_round_trip_per_sudo_setting() -> None:
    guest = ShellGuest()
    cmds = [Command(c, sudo=i % 3 != 0) for i, c in enumerate(COMMANDS)]
    results = run_many(guest, cmds)
    assert len(guest.calls) == 2
    assert results == [_alone(c) for c in COMMANDS]


def test_a_guest_without_batches_runs_each_command_on_its_own() -> None:
    guest = ShellGuest(runs_batches=False)
    results = run_many(guest, [Command(c) for c in COMMANDS])
    assert guest.calls == COMMANDS
    assert results == [_alone(c) for c in COMMANDS]


def test_a_cut_batch_output_falls_back_to_one_by_one_for_what_it_lost() -> None:
    guest = ShellGuest(mangle=True)
    results = run_many(guest, [Command(c) for c in COMMANDS])
    assert results == [_alone(c) for c in COMMANDS]
    assert 1 < len(guest.calls) < 1 + len(COMMANDS)  # the records that came through were used


def test_long_batches_are_cut_below_the_argument_limit() -> None:
    big = [f"echo {i} {'x' * 4000}" for i in range(40)]  # about 160 KiB of commands
    guest = ShellGuest()
    results = run_many(guest, [Command(c) for c in big])
    assert results == [_alone(c) for c in big]
    assert 3 <= len(guest.calls) <= 6
    assert all(len(c) < BATCH_MAX_CHARS + 4096 for c in guest.calls)


def test_a_command_whose_own_run_raises_gets_its_exception() -> None:
    @dataclass
    class Unreachable:
        def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
            raise VMError("SSH to vm: connection lost")

    out = run_many(Unreachable(), [Command("true"), Command("false")])
    assert all(isinstance(r, VMError) for r in out)


# --- the checks, batched, over a planted fake root ------------------------------------------------------

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGVxYW1wbGVrZXlmb3J0ZXN0c29ubHkxMjM0NTY3ODkw imagekit-test"
PROFILE = ProvisioningProfile(hostname="ikvm", username="azureuser", ssh_public_keys=(KEY,))


def _planted(root: Path) -> FakeRoot:
    f = FakeRoot(root)
    f.users([("root", 0, "/root", "*"), ("nobody", 65534, "/nonexistent", "*"),
             ("azureuser", 1000, "/home/azureuser", "!"), ("builder", 1001, "/home/builder", "$6$x$y")])
    f.write("/home/azureuser/.ssh/authorized_keys", KEY + "\n", 0o600)
    f.write("/root/.bash_history", "ls\n", 0o600)
    f.write("/etc/fstab", "UUID=abc / ext4 defaults 0 1\n/dev/disk/cloud/azure_resource-part1 /mnt auto 0 2\n")
    f.write("/etc/ssh/sshd_config", "ClientAliveInterval 180\nPasswordAuthentication no\n")
    f.write("/proc/swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
    return f


@pytest.mark.skipif(not can_run(), reason="needs root and unshare (private mount namespaces)")
@pytest.mark.parametrize("distro_id", ["debian-12", "debian-12-cloudinit"])
def test_batched_checks_judge_exactly_as_one_probe_at_a_time(tmp_path: Path, distro_id: str) -> None:
    d = distros.get(distro_id)
    fake = _planted(tmp_path / "root")
    fabric = RecordedFabric((HealthReport("Ready"),))

    def run(batches: bool) -> tuple[list[tuple[str, Status, str, str]], int]:
        guest = fake.guest()
        guest.runs_batches = batches  # type: ignore[attr-defined]
        runs = run_checks(CheckContext(guest=guest, distro=d, profile=PROFILE, plan=plan_for(d), fabric=fabric))
        return [(r.check.id, r.result.status, r.result.summary, r.result.evidence) for r in runs], len(guest.calls)

    alone, alone_calls = run(False)
    batched, batched_calls = run(True)
    assert [r[0] for r in batched] == list(catalogue())
    for a, b in zip(alone, batched, strict=True):
        assert a == b, a[0]
    # Both verdicts are seen (the fake root is right in some ways and wrong in others), so the comparison
    # covers passing, failing and erroring checks alike.
    assert {Status.PASS, Status.FAIL, Status.ERROR} <= {r[1] for r in batched}
    assert batched_calls * 4 <= alone_calls, (batched_calls, alone_calls)


def test_a_batch_runs_its_commands_side_by_side(tmp_path: Path) -> None:
    """The first command waits (up to its timeout) for a file the second one makes: run one after the other
    it would time out; side by side it sees the file."""
    flag = tmp_path / "flag"
    cmds = [Command(f"while [ ! -e {flag} ]; do sleep 0.1; done; echo saw it", timeout=20),
            Command(f"sleep 0.5; touch {flag}")]
    p = subprocess.run(["/bin/sh", "-c", batch_script(cmds)], capture_output=True, text=True, timeout=60)
    got = parse_batch(p.stdout, cmds)
    assert got[0] == CommandResult(cmds[0].command, 0, "saw it\n", "")
    assert got[1].returncode == 0
