"""What the toolkit needs from a running guest: run a command and get a result back.

The SSH connection (:mod:`imagekit.vm.ssh`) implements :class:`Guest`; checks, resource-disk set-up and
deprovisioning take a ``Guest`` and nothing more, so they do not care how the commands reach the guest.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandResult:
    """The outcome of one command in the guest."""

    command: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def evidence(self, limit: int = 4000) -> str:
        """The command and its output, as a check's evidence (trimmed to ``limit`` characters)."""
        text = f"$ {self.command}\n{self.stdout}"
        if self.stderr.strip():
            text += f"\n[stderr]\n{self.stderr}"
        if self.returncode != 0:
            text += f"\n[exit code {self.returncode}]"
        return text if len(text) <= limit else text[: limit - 20] + "\n…(trimmed)"


class Guest(Protocol):
    """A running guest that runs shell commands."""

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        """Run ``command`` through ``sh -c`` in the guest (as root when ``sudo``); never raises on a
        non-zero exit, only when the guest cannot be reached."""
        ...


# --- several commands in one round trip ------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """One command to run in the guest, as :meth:`Guest.run` takes it."""

    command: str
    sudo: bool = True
    timeout: float = 120.0


# A batch prints one record per command: the marker, its index, its exit code, then its stdout and its stderr
# base64-encoded (so any bytes, newlines and marker look-alikes in the output stay data), and the end marker.
BATCH_RECORD = "@@imagekit-batch"
BATCH_END = "@@imagekit-batch-end"
BATCH_TIMED_OUT = (124, 137)  # GNU timeout's exit codes: the command timed out (137: and needed SIGKILL)
# A batch travels as one argument of the remote command line; Linux caps one argument at 128 KiB.
BATCH_MAX_CHARS = 48 * 1024


BATCH_LANES = 3  # commands of a batch run in this many lanes side by side (guest commands mostly wait)


def batch_script(commands: Sequence[Command], lanes: int = BATCH_LANES) -> str:
    """A POSIX sh script that runs the commands, each through ``sh -c`` with stdin from /dev/null and its own
    ``timeout``, in ``lanes`` lanes side by side (command i in lane i mod lanes, in order), then prints one
    record per command in command order. Commands do not see each other's output; one failing or timing out
    does not stop the next. A command whose lane was killed leaves no exit code, so no record."""
    lines = ['d=$(mktemp -d) || exit 97', "trap 'rm -rf \"$d\"' EXIT"]
    for lane in range(max(1, lanes)):
        steps = [
            f'timeout -k 5 {math.ceil(c.timeout)} sh -c {shlex.quote(c.command)} </dev/null >"$d/{i}.o" '
            f'2>"$d/{i}.e"; echo $? >"$d/{i}.rc"'
            for i, c in enumerate(commands) if i % max(1, lanes) == lane
        ]
        if steps:
            lines.append("( " + "\n".join(steps) + "\n) &")
    lines.append("wait")
    for i in range(len(commands)):
        lines += [
            f"printf '{BATCH_RECORD} {i} %s ' \"$(cat \"$d/{i}.rc\" 2>/dev/null)\"",
            f'base64 -w0 <"$d/{i}.o" && printf \' \' && base64 -w0 <"$d/{i}.e" && echo || echo',
        ]
    lines.append(f"echo {BATCH_END}")
    return "\n".join(lines) + "\n"


def parse_batch(stdout: str, commands: Sequence[Command]) -> dict[int, CommandResult]:
    """The records of a batch's output by command index; a malformed record is left out (its command then
    runs on its own). Output is decoded as :meth:`Guest.run` decodes it (UTF-8, undecodable bytes replaced)."""
    out: dict[int, CommandResult] = {}
    for line in stdout.splitlines():
        parts = line.split(" ")
        if len(parts) != 5 or parts[0] != BATCH_RECORD:
            continue
        try:
            i, code = int(parts[1]), int(parts[2])
            so = base64.b64decode(parts[3], validate=True).decode(errors="replace")
            se = base64.b64decode(parts[4], validate=True).decode(errors="replace")
        except (ValueError, binascii.Error):
            continue
        if not 0 <= i < len(commands) or i in out:
            continue
        c = commands[i]
        if code in BATCH_TIMED_OUT:
            se += f"\n[imagekit: timeout exited {code}: the command did not finish within {math.ceil(c.timeout)} s]"
        out[i] = CommandResult(command=c.command, returncode=code, stdout=so, stderr=se)
    return out


def run_many(guest: Guest, commands: Sequence[Command]) -> list[CommandResult | Exception]:
    """Run ``commands``, each as :meth:`Guest.run` would, in as few round trips as the guest allows: a guest
    whose ``runs_batches`` is true gets :func:`batch_script` runs (per sudo setting, under
    :data:`BATCH_MAX_CHARS` each); any other guest, and any command whose record a batch did not return, runs
    on its own. Each entry is the command's result, or the exception its own run raised (the guest could not
    be reached, the command outlived its timeout)."""
    results: dict[int, CommandResult | Exception] = {}
    if getattr(guest, "runs_batches", False):
        for sudo in (True, False):
            for idx in _chunks([i for i, c in enumerate(commands) if c.sudo is sudo], commands):
                results.update(_run_batch(guest, commands, idx, sudo))
    for i, c in enumerate(commands):
        if i not in results:
            try:
                results[i] = guest.run(c.command, sudo=c.sudo, timeout=c.timeout)
            except Exception as exc:  # handed to whoever asked for this command, to raise there
                results[i] = exc
    return [results[i] for i in range(len(commands))]


def _chunks(idx: list[int], commands: Sequence[Command]) -> list[list[int]]:
    """``idx`` cut into runs whose batch scripts stay under :data:`BATCH_MAX_CHARS`; a run of one command is
    left out (it runs on its own)."""
    out: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i in idx:
        n = len(shlex.quote(commands[i].command)) + 200
        if cur and size + n > BATCH_MAX_CHARS:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    out.append(cur)
    return [c for c in out if len(c) > 1]


def _run_batch(guest: Guest, commands: Sequence[Command], idx: list[int], sudo: bool) -> dict[int, CommandResult]:
    group = [commands[i] for i in idx]
    try:
        res = guest.run(batch_script(group), sudo=sudo, timeout=sum(c.timeout + 5 for c in group) + 30)
    except Exception as exc:  # the commands then run on their own, and say for themselves what fails
        log.debug("a batch of %d commands failed, running them one by one: %s", len(group), exc)
        return {}
    got = parse_batch(res.stdout, group)
    if len(got) != len(group) or BATCH_END not in res.stdout:
        log.debug("a batch of %d commands returned %d records (exit %d; stderr %r): running the rest one by "
                  "one", len(group), len(got), res.returncode, res.stderr[-300:])
    return {idx[j]: r for j, r in got.items()}
