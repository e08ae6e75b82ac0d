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
# --- base images --------------------------------------------------------------------------------
# --- provisioning on the local platform --------------------------------------------------------
# --- checks ---------------------------------------------------------------------------------------
# --- build, capture, gallery -----------------------------------------------------------------------
