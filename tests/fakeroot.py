"""A guest whose shell is real: each command runs with ``sh -c`` (/bin/sh: dash, as on Debian) — the very string
the SSH connection sends — in a private mount namespace where a planted file tree stands in for the guest's
files. Not a VM: the kernel, systemd and the block devices are the host's, so tools that report on those
(lsblk, systemctl, sshd -T, modprobe) are planted as small scripts that print what the real tool prints.

Inside the namespace (created per command with ``unshare --mount``, gone when the command ends):

* ``/etc``, ``/var`` and ``/boot`` (and any other top-level directory planted) are overlays: the planted
  files win, the host's stay visible underneath, so the shell's own tools still work;
* ``/root``, ``/home`` and every path in ``replace`` are bind-mounted from the planted tree whole, so
  nothing of the host's (its own shell history, its SSH host keys) shows through;
* planted ``proc/<file>`` files are bind-mounted over ``/proc/<file>`` (/proc/swaps, /proc/cmdline);
* ``<root>/.bin`` is first on PATH: the planted tools.

Needs root (mounts); the tests that use it are skipped otherwise.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from imagekit.vm.guest import CommandResult

ALWAYS_REPLACED = ("/root", "/home")
OVERLAID = ("etc", "var", "boot")


def can_run() -> bool:
    return os.geteuid() == 0 and Path("/usr/bin/unshare").exists()


class FakeRoot:
    """A planted tree: ``write`` files into it, ``tool`` plants a command; ``guest()`` runs commands in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for d in (*OVERLAID, "root", "home", ".bin"):
            (root / d).mkdir(parents=True, exist_ok=True)

    def path(self, guest_path: str) -> Path:
        return self.root / guest_path.lstrip("/")

    def write(self, guest_path: str, text: str = "", mode: int = 0o644) -> Path:
        p = self.path(guest_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(mode)
        return p

    def mkdir(self, guest_path: str) -> Path:
        p = self.path(guest_path)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def tool(self, name: str, script: str) -> None:
        """A command on PATH: ``script`` is its /bin/sh body (``$1``... are its arguments)."""
        self.write(f"/.bin/{name}", "#!/bin/sh\n" + script + "\n", mode=0o755)

    def users(self, rows: Iterable[tuple[str, int, str, str]]) -> None:
        """/etc/passwd and /etc/shadow from (name, uid, home, shadow password field)."""
        rows = list(rows)
        self.write("/etc/passwd", "".join(f"{n}:x:{u}:{u}::{h}:/bin/sh\n" for n, u, h, _ in rows))
        self.write("/etc/shadow", "".join(f"{n}:{pw}:19000:0:99999:7:::\n" for n, _, _, pw in rows), mode=0o640)

    def guest(self, replace: Iterable[str] = (), uid: int | None = None) -> FakeRootGuest:
        return FakeRootGuest(self, tuple(replace), uid)


class FakeRootGuest:
    """:class:`imagekit.vm.guest.Guest` over a :class:`FakeRoot`; ``uid`` runs the command as that user
    (what a guest whose sudo did not take effect would do)."""

    def __init__(self, fake: FakeRoot, replace: tuple[str, ...] = (), uid: int | None = None) -> None:
        self.fake = fake
        self.replace = (*ALWAYS_REPLACED, *replace)
        self.uid = uid
        self.calls: list[str] = []

    def _setup(self) -> str:
        r = self.fake.root
        lines = ["set -e"]
        for d in sorted(p.name for p in r.iterdir() if p.is_dir() and p.name not in ("root", "home", ".bin", "proc")):
            target = os.path.realpath(f"/{d}")
            lines.append(f"mount -t overlay overlay -o lowerdir={shlex.quote(str(r / d))}:{target} {target}")
        for g in self.replace:
            src = r / g.lstrip("/")
            src.mkdir(parents=True, exist_ok=True)
            lines.append(f"mkdir -p {shlex.quote(g)} 2>/dev/null || true")
            lines.append(f"mount --bind {shlex.quote(str(src))} {shlex.quote(g)}")
        proc = r / "proc"
        if proc.is_dir():
            for f in sorted(proc.iterdir()):
                lines.append(f"mount --bind {shlex.quote(str(f))} /proc/{shlex.quote(f.name)}")
        lines.append(f"export PATH={shlex.quote(str(r / '.bin'))}:/usr/sbin:/usr/bin:/sbin:/bin")
        lines.append("set +e")
        run_as = (f"setpriv --reuid={self.uid} --regid={self.uid} --clear-groups " if self.uid is not None else "")
        lines.append(f'exec {run_as}sh -c "$1"')  # as SSHGuest.run sends it: ``sh -c`` ($0 is "sh")
        return "\n".join(lines)

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        self.calls.append(command)
        p = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", self._setup(),
                            "sh", command], capture_output=True, text=True, timeout=timeout, cwd="/")
        return CommandResult(command, p.returncode, p.stdout, p.stderr)


def env_lines(mapping: Mapping[str, str]) -> str:
    return "".join(f"{k} {v}\n" for k, v in mapping.items())
