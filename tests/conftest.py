"""Shared fixtures. Tests that boot a VM or build a disk image carry the ``vm`` marker."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagekit.core.paths import REPO_ROOT

SHARED = REPO_ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "walinuxagent"


@pytest.fixture
def wa_fixtures() -> Path:
    """The WALinuxAgent test data in ../shared (skips, saying why, in a clone without it)."""
    if not FIXTURES.is_dir():
        pytest.skip(f"WALinuxAgent fixtures not found at {FIXTURES} (../shared is absent in this clone)")
    return FIXTURES


# The Debian suites whose agent packages serve as oracles: bookworm (waagent 2.7.3, cloud-init 22.4)
# and trixie (waagent 2.12, cloud-init 25.1), the versions the Debian 12 and 13 images ship.
ORACLE_SUITES = ("bookworm", "trixie")


@pytest.fixture(params=ORACLE_SUITES)
def oracle_suite(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def waagent_lib(oracle_suite: str) -> Path:
    """waagent's own Python code (azurelinuxagent) from the Debian package, importable; returns its root."""
    from tests.oracles import activate

    return activate(oracle_suite)


@pytest.fixture
def cloudinit_lib(oracle_suite: str) -> Path:
    """cloud-init's own Python code (cloudinit) from the Debian package, importable; returns its root."""
    from tests.oracles import activate

    return activate(oracle_suite)


@pytest.fixture(scope="module")
def host_listener() -> Iterator[int]:
    """A TCP listener on all of the host's addresses: a service the guest must NOT be able to reach."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 0))
    srv.listen()
    yield srv.getsockname()[1]
    srv.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A fresh 0700 directory with a short path, like a VM's private dir: sockaddr_un allows 107 bytes,
    and pytest's tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix="ik-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- running the VM lane side by side (pytest-xdist, --dist loadgroup) ---------------------------------------

# The VM lane's modules, longest-running first: xdist hands work out in collection order, so the long
# builds start at once on separate workers and the short tests fill in around them at the end.
VM_LANE_ORDER = ("test_build_vm", "test_provision_vm", "test_base_image", "test_base_download",
                 "test_capture", "test_vm")


def _module_scoped_params(item: pytest.Item) -> list[str]:
    """``fixture[param]`` for each module- or wider-scoped parametrized fixture the item uses: tests that share
    one such fixture value must run on the same worker, or each worker would set it up (boot a VM) again."""
    callspec = getattr(item, "callspec", None)
    info = getattr(item, "_fixtureinfo", None)
    if callspec is None or info is None:
        return []
    out = []
    for name, value in callspec.params.items():
        defs = info.name2fixturedefs.get(name)
        if defs and defs[-1].scope in ("module", "package", "session"):
            # No brackets or '@': xdist reads a node id's group as what follows its last '@', unless a ']'
            # comes after that '@' (then it takes the '@' for part of a parameter and the test goes alone).
            out.append(f"{name}={value}".replace("[", "(").replace("]", ")").replace("@", "_"))
    return out


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        shared = _module_scoped_params(item)
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__ + ":" + ",".join(shared)))  # type: ignore[attr-defined]

    def rank(item: pytest.Item) -> int:
        name = item.module.__name__.rsplit(".", 1)[-1]  # type: ignore[attr-defined]
        return VM_LANE_ORDER.index(name) if name in VM_LANE_ORDER else len(VM_LANE_ORDER)

    items.sort(key=rank)  # stable: the order inside a module stays as pytest made it
