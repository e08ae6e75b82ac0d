"""What the toolkit needs from a running guest: run a command and get a result back.

The SSH connection (:mod:`imagekit.vm.ssh`) implements :class:`Guest`; checks, resource-disk set-up and
deprovisioning take a ``Guest`` and nothing more, so they do not care how the commands reach the guest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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
