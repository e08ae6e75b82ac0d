"""Shared fixtures. Tests that boot a VM or build a disk image carry the ``vm`` marker."""

from __future__ import annotations

import re
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


# --- running the VM lane side by side (pytest-xdist, the scheduler below) ---------------------------------------

# The VM lane's modules, longest-running first: xdist hands work out in collection order, so the long
# builds start at once on separate workers and the short tests fill in around them at the end.
VM_LANE_ORDER = ("test_build_vm", "test_provision_vm", "test_matrix_vm", "test_base_image", "test_base_download",
                 "test_capture", "test_vm")


# Modules whose parametrized tests share one module-scoped VM (or base image) per parameter: the tests of one
# parameter must run on one worker, or each worker would set it up (boot the VM) again.
SHARED_PER_PARAMETER = ("tests/test_provision_vm.py", "tests/test_base_image.py")
_PARAM = re.compile(r"\[([^\]]*)\]$")
# Modules whose tests all share module-scoped disk images: the whole module is one unit of work.
SHARED_PER_MODULE = ("tests/test_inspect.py", "tests/test_scan_file.py")


def vm_scope(nodeid: str) -> str:
    """The unit of work a test goes to a worker in: ``module[param]`` for the parametrized tests of
    :data:`SHARED_PER_PARAMETER`, the module for :data:`SHARED_PER_MODULE`, else the test alone."""
    module = nodeid.split("::", 1)[0]
    m = _PARAM.search(nodeid)
    if module in SHARED_PER_PARAMETER and m:
        return f"{module}[{m.group(1)}]"
    if module in SHARED_PER_MODULE:
        return module
    return nodeid


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Work units by :func:`vm_scope` (xdist's own ``--dist loadgroup`` marks do not reach the node ids
    under pytest 9, which keeps a node's id where xdist 3.8 no longer writes it)."""
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

    class SharedVMScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return vm_scope(nodeid)

    return SharedVMScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.module.__name__.rsplit(".", 1)[-1]  # type: ignore[attr-defined]
        return VM_LANE_ORDER.index(name) if name in VM_LANE_ORDER else len(VM_LANE_ORDER)

    items.sort(key=rank)  # stable: the order inside a module stays as pytest made it
