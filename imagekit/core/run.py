"""The one way the toolkit runs external commands.

argv lists only (never a shell string), stdin from /dev/null unless input is given, and on failure a
:class:`~imagekit.core.errors.CommandError` that carries argv, the exit code and the tail of stderr. Every
command is logged as a copy-pasteable ``shlex.join(argv)`` at debug level.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from imagekit.core.errors import CommandError, HostError

log = logging.getLogger(__name__)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    input: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    capture: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and return the completed process (text mode).

    ``env`` entries are added to a copy of the current environment with ``LC_ALL=C.UTF-8`` so that
    parsed output does not depend on the user's locale.
    """
    args = [os.fspath(a) for a in argv]
    full_env = dict(os.environ)
    full_env["LC_ALL"] = "C.UTF-8"
    if env:
        full_env.update(env)
    log.debug("$ %s", shlex.join(args))
    if isinstance(input, str):
        input = input.encode()
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=full_env,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise HostError(f"command not found: {args[0]}", hint="run the README's set-up command") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(args, -1, "", f"timed out after {timeout} s") from exc
    out = proc.stdout.decode(errors="replace") if proc.stdout is not None else ""
    err = proc.stderr.decode(errors="replace") if proc.stderr is not None else ""
    result = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, out, err)
    return result


def which(name: str) -> Path | None:
    """Find ``name`` on PATH, also in the sbin directories that a non-login root shell may lack."""
    found = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    return Path(found) if found else None


def require(*names: str) -> None:
    """Fail with one clear message listing every missing host command."""
    missing = [n for n in names if which(n) is None]
    if missing:
        raise HostError(
            f"missing host commands: {', '.join(missing)}",
            hint="run the README's set-up command (./ik setup), which installs them",
        )
