"""The Azure agents' own code as test oracles, unpacked from Debian packages — never installed.

``apt-get download`` fetches ``waagent`` and ``cloud-init`` for a Debian suite through a private apt
configuration (its own sources list, state and cache under the imagekit cache; the host's apt state is
untouched), ``dpkg-deb -x`` unpacks them into ``<cache>/oracles/<suite>/``, and the tests import
``azurelinuxagent`` and ``cloudinit`` from there. Installing cloud-init on a workstation would make it run
at the next boot; unpacking does not.

The mirror is the one the host's apt sources already use for Debian (or ``$IMAGEKIT_DEBIAN_MIRROR``).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from imagekit.core.errors import HostError
from imagekit.core.paths import cache_dir
from imagekit.core.run import run

PACKAGES = ("waagent", "cloud-init")
SITE = Path("usr/lib/python3/dist-packages")


def debian_mirror() -> str:
    """The Debian archive URI the host's apt uses (deb822 or one-line sources), or the env override."""
    env = os.environ.get("IMAGEKIT_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file() or f.suffix not in ("", ".list", ".sources"):
            continue
        for m in re.finditer(r"(?:URIs:|^deb)\s+(?:\[[^\]]*\]\s+)?(\S+)", f.read_text(), re.M):
            uri = m.group(1).rstrip("/")
            if uri.endswith("/debian"):
                return uri
    raise HostError(
        "no Debian archive found in the host's apt sources",
        hint="set IMAGEKIT_DEBIAN_MIRROR to a Debian archive URI",
    )


def oracle_root(suite: str = "bookworm") -> Path:
    """Unpack the agents' packages for ``suite`` once; return the folder that holds their Python code."""
    dest = cache_dir() / "oracles" / suite
    site = dest / SITE
    if (dest / ".complete").exists():
        return site
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Test workers side by side (pytest-xdist) may all ask at once: one unpacks, the others wait for it,
    # and a complete tree is never replaced under a worker that is importing from it.
    with (dest.parent / f".{suite}.lock").open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (dest / ".complete").exists():
            return site
        _unpack(suite, dest)
    return site


def _unpack(suite: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{suite}-") as tmp_s:
        tmp = Path(tmp_s)
        apt = tmp / "apt"
        for d in ("state/lists/partial", "cache/archives/partial", "etc/apt.conf.d", "etc/preferences.d"):
            (apt / d).mkdir(parents=True)
        (apt / "etc/sources.list").write_text(f"deb {debian_mirror()} {suite} main\n")
        opts = [
            f"-oDir::State={apt / 'state'}",
            f"-oDir::Cache={apt / 'cache'}",
            f"-oDir::Etc::SourceList={apt / 'etc/sources.list'}",
            "-oDir::Etc::SourceParts=/nonexistent",
            f"-oDir::Etc::Preferences={apt / 'etc/preferences'}",
            f"-oDir::Etc::PreferencesParts={apt / 'etc/preferences.d'}",
            "-oDir::State::status=/dev/null",
            "-oAPT::Sandbox::User=root",
            "-oAcquire::Languages=none",
        ]
        run(["apt-get", *opts, "update", "-qq"], timeout=600)
        debs = tmp / "debs"
        debs.mkdir()
        run(["apt-get", *opts, "download", *PACKAGES], cwd=debs, timeout=600)
        unpacked = tmp / "root"
        for deb in sorted(debs.glob("*.deb")):
            run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        versions = {deb.name.split("_")[0]: deb.name.split("_")[1] for deb in debs.glob("*.deb")}
        (unpacked / "VERSIONS").write_text("".join(f"{k} {v}\n" for k, v in sorted(versions.items())))
        (unpacked / ".complete").touch()
        if dest.exists():  # an incomplete tree of an interrupted run (the lock is held: nobody else's)
            shutil.rmtree(dest)
        unpacked.rename(dest)


def versions(suite: str = "bookworm") -> dict[str, str]:
    """The package versions unpacked for ``suite`` (e.g. ``{"waagent": "2.7.3.0-4.1", ...}``)."""
    oracle_root(suite)
    text = (cache_dir() / "oracles" / suite / "VERSIONS").read_text()
    return dict(line.split(" ", 1) for line in text.splitlines() if line)


def activate(suite: str = "bookworm") -> Path:
    """Put the agents' code for ``suite`` first on sys.path (dropping another suite's) and return it.

    Modules already imported from another suite are evicted so that the next import loads this one.
    """
    site = oracle_root(suite)
    others = str(cache_dir() / "oracles")
    sys.path[:] = [p for p in sys.path if not p.startswith(others)]
    sys.path.insert(0, str(site))
    for name in list(sys.modules):
        if name.split(".")[0] in ("azurelinuxagent", "cloudinit"):
            mod = sys.modules[name]
            if not str(getattr(mod, "__file__", "") or "").startswith(str(site)):
                del sys.modules[name]
    return site
