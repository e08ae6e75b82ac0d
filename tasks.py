"""imagekit's Invoke tasks: each parses its options, calls the library, prints. Nothing else lives here.

Run them through ./ik (which sets up first) or .venv/bin/invoke once set up.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from imagekit.errors import ImagekitError
from imagekit.log import setup_logging

F = TypeVar("F", bound=Callable[..., Any])


def _cli(fn: F) -> F:
    """Turn toolkit errors into a message and exit code 1, Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging(verbose=bool(kwargs.get("verbose")))
        try:
            return fn(*args, **kwargs)
        except ImagekitError as exc:
            raise Exit(f"imagekit: error: {exc}", code=1) from exc
        except KeyboardInterrupt:
            print("imagekit: interrupted; cleaned up", file=sys.stderr)
            raise Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


# --- distro table -------------------------------------------------------------------------------


@task(help={"verbose": "log debug detail"})
@_cli
def distros(c: Context, verbose: bool = False) -> None:
    """Print the distro table: id, agent, image source, and whether it can be built on this machine."""
    from imagekit import distros as table

    rows = [("ID", "AGENT", "SOURCE", "BUILDS HERE")]
    for d in table.default_table().values():
        ok, why = d.buildable_here()
        rows.append((d.id, d.agent.value, d.source.kind.value, ("yes: " if ok else "no: ") + why))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])


# --- OVF provisioning ISO (issue: foundation) -----------------------------------------------------


@task(
    help={
        "hostname": "the VM's host name (Azure's computerName rules: 1-64 of A-Z a-z 0-9 . -)",
        "username": "the admin user to create (Azure's adminUsername rules; root, admin, ... are refused)",
        "ssh_key": "an OpenSSH public key file (.pub; RSA >= 2048 bits or Ed25519); repeat for more keys",
        "password_file": "a file whose first line is the user's password (kept out of logs and errors)",
        "custom_data": "a file passed as CustomData (cloud-config, script, ...; at most 65535 bytes)",
        "disable_password_auth": "disable SSH password authentication (default; --no-... enables it)",
        "output": "where to write the ISO (written 0600, atomically; nothing is left on error)",
        "verbose": "log debug detail",
    },
    iterable=["ssh_key"],
)
@_cli
def iso(
    c: Context,
    hostname: str = "",
    username: str = "",
    ssh_key: list[str] | None = None,
    password_file: str | None = None,
    custom_data: str | None = None,
    disable_password_auth: bool = True,
    output: str = "",
    verbose: bool = False,
) -> None:
    """Write an OVF provisioning ISO (ovf-env.xml on ISO9660+Joliet+Rock Ridge+UDF) that Azure's agents read."""
    from imagekit.iso import write_ovf_iso
    from imagekit.ovf import ProvisioningProfile

    missing = [f"--{n}" for n, v in (("hostname", hostname), ("username", username), ("output", output)) if not v]
    if missing:
        raise ImagekitError(f"missing required option(s): {', '.join(missing)}", hint="see: invoke --help iso")
    profile = ProvisioningProfile.from_files(
        hostname=hostname,
        username=username,
        ssh_key_files=ssh_key or [],
        password_file=password_file,
        custom_data_file=custom_data,
        disable_password_auth=disable_password_auth,
    )
    path = write_ovf_iso(profile, output)
    print(path)
# --- base images --------------------------------------------------------------------------------
@task(help={
    "distro": "distro id from the table (invoke distros lists them), e.g. debian-12",
    "rebuild": "build again even if an image with the same inputs is cached",
    "verbose": "log debug detail (every command run)",
})
@_cli
def base(c: Context, distro: str = "debian-12", rebuild: bool = False, verbose: bool = False) -> None:
    """Build (or find in the cache) the distro's base image; print its path on the last line.

    The image is read-only: put a qcow2 overlay on it, never write to it.
    """
    from imagekit.base import ensure_base

    img = ensure_base(distro, rebuild=rebuild)
    print(f"{img.distro_id}: kernel {img.kernel}, {len(img.packages)} packages, "
          f"{'cached' if img.cached else 'built'}; meta {img.meta}")
    print(img.path)


# --- provisioning on the local platform --------------------------------------------------------
# --- checks ---------------------------------------------------------------------------------------


@task(
    help={
        "distro": "the distro id to provision and check (see: invoke distros)",
        "report_dir": "where junit.xml, report.json and report.html go (default: reports/<distro>-<time>/)",
        "swap_percent": "cloud-init images: give the resource disk a swap partition of this share (0: none)",
        "only": "comma-separated check ids or categories to run (default: all)",
        "keep": "leave the VM running afterwards and print how to log in",
        "verbose": "log debug detail",
    }
)
@_cli
def check(
    c: Context,
    distro: str = "",
    report_dir: str = "",
    swap_percent: int = 0,
    only: str = "",
    keep: bool = False,
    verbose: bool = False,
) -> None:
    """Provision a throwaway VM, run the checks over SSH, write reports; exit code 1 if a check fails."""
    from pathlib import Path

    from imagekit import distros as table
    from imagekit.checks import catalogue, select, summary_table
    from imagekit.checks.pipeline import check_distro
    from imagekit.errors import CheckFailed, InputError

    if not distro:
        raise InputError("missing required option --distro", hint="see: invoke distros")
    d = table.get(distro)
    names = [n.strip() for n in only.split(",") if n.strip()]
    ids = [n for n in names if n in catalogue()]
    categories = [n for n in names if n not in ids]
    chosen = None
    if names:
        chosen = (select(ids=ids) if ids else []) + (select(categories=categories) if categories else [])
    outcome = check_distro(d, report_dir=Path(report_dir) if report_dir else None,
                           swap_percent=swap_percent or None, checks=chosen, keep=keep)
    print(summary_table(outcome.runs))
    for kind, path in outcome.reports.items():
        print(f"{kind:6} {path}")
    if not outcome.ok:
        bad = [r.check.id for r in outcome.runs if not r.result.ok]
        raise CheckFailed(f"{len(bad)} check(s) did not pass: {', '.join(bad)}",
                          hint=f"evidence in {outcome.reports['html']}")
# --- build, capture, gallery -----------------------------------------------------------------------
