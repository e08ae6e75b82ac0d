"""Handing a kept VM's fabric over to a detached keeper process: the same answers on the same socket
paths, no secret in its log, and it ends by itself when the watched process (the VM) does.

The "VM" here is a ``sleep`` process: the keeper only watches a pid, so a real QEMU adds nothing to what
these tests decide (the VM-level check is in test_provision_vm.py)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagekit.config.profile import ProvisioningProfile
from imagekit.fabric import Fabric, SocketPaths, VMIdentity
from imagekit.fabric.keeper import (
    HANDOVER_NAME,
    HandoverError,
    Keeper,
    documents_digest,
    hand_over,
    handover_document,
    process_start,
    read_handover,
    write_handover,
)
from imagekit.vm.runner import sweep_stale
from tests.test_fabric import WIRE_HEADERS, _health_xml, _key, request

PASSWORD = "Kp-9xQ!handover-Secret"
CUSTOM_DATA = b"#cloud-config\nwrite_files: [{path: /etc/ik-secret, content: custom-data-SECRET-7f3a}]\n"
IMDS = "/metadata/instance?api-version=2021-08-01"


def _profile() -> ProvisioningProfile:
    return ProvisioningProfile(hostname="vm-keep", username="azureuser", ssh_public_keys=(_key(),),
                               password=PASSWORD, custom_data=CUSTOM_DATA, disable_password_auth=False)


def _fabric() -> Fabric:
    return Fabric(_profile(), VMIdentity(uuid.uuid4(), mac="52:54:00:ab:cd:ef", ip="10.0.0.4"), name="vm-keep")


@pytest.fixture
def private(sockdir: Path) -> Path:
    return sockdir


@pytest.fixture
def vm_process() -> Iterator[subprocess.Popen[bytes]]:
    """Stands in for the VM's namespace child: the keeper serves while it lives."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def keepers() -> Iterator[list[Keeper]]:
    made: list[Keeper] = []
    yield made
    for k in made:
        k.stop()


def _answers(paths: SocketPaths) -> dict[str, Any]:
    """What an agent reads: the documents, and the ids it compares between goal states."""
    out: dict[str, Any] = {}
    status, _, versions = request(paths.wire, "GET", "/?comp=versions", WIRE_HEADERS)
    assert status == 200
    status, _, goal = request(paths.wire, "GET", "/machine/?comp=goalstate", WIRE_HEADERS)
    assert status == 200
    status, _, hostga = request(paths.hostga, "GET", "/versions")
    assert status == 200
    status, _, imds = request(paths.imds, "GET", IMDS, {"Metadata": "true"})
    assert status == 200
    root = ET.fromstring(goal)
    out["bodies"] = (versions, goal, hostga, imds)
    out["incarnation"] = root.findtext("Incarnation")
    out["container_id"] = root.findtext("Container/ContainerId")
    out["instance_id"] = root.findtext("Container/RoleInstanceList/RoleInstance/InstanceId")
    compute = json.loads(imds)["compute"]
    out["vm_id"] = compute["vmId"]
    out["hostname"] = compute["osProfile"]["computerName"]
    return out


def _wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.1)


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (a keeper names its handover file)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and process_start(int(entry.name)) is not None:
            found.append(int(entry.name))
    return found


def _assert_no_secret(text: str) -> None:
    for secret in (PASSWORD, CUSTOM_DATA.decode(), "custom-data-SECRET-7f3a", base64.b64encode(CUSTOM_DATA).decode()):
        assert secret not in text


def test_handover_serves_the_same_answers_until_the_vm_exits(
    private: Path, vm_process: subprocess.Popen[bytes], keepers: list[Keeper]
) -> None:
    fabric = _fabric()
    paths = fabric.start(private)
    before = _answers(paths)
    assert before["incarnation"] == "1"
    log_path = private.parent / f"{private.name}-keeper.log"
    try:
        keeper = hand_over(fabric, watch_pid=vm_process.pid, log_path=log_path)
        keepers.append(keeper)
        assert fabric.sockets is None  # the in-process servers stopped
        assert keeper.pid != os.getpid() and os.getsid(keeper.pid) == keeper.pid  # its own session
        after = _answers(paths)
        for field in ("incarnation", "container_id", "instance_id", "vm_id", "hostname"):
            assert after[field] == before[field], field
        assert after["bodies"] == before["bodies"]
        # IMDS still wants the header, as Azure does.
        assert request(paths.imds, "GET", IMDS)[0] == 400
        # The agent's reports keep being accepted (and the keeper logs the state, not the body).
        assert request(paths.wire, "POST", "/machine?comp=health", WIRE_HEADERS, _health_xml(fabric, "Ready"))[0] == 200
        assert sorted(p.name for p in private.iterdir()) == ["hostga.sock", "imds.sock", "wire.sock"]
        assert stat.S_IMODE(paths.wire.stat().st_mode) == 0o600

        vm_process.kill()
        vm_process.wait()
        assert keeper.proc.wait(timeout=30) == 0
        assert list(private.iterdir()) == []
        text = log_path.read_text()
        assert "process" in text and "exited" in text and "reported Ready" in text
        _assert_no_secret(text)
        assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    finally:
        log_path.unlink(missing_ok=True)


def test_keeper_outlives_the_process_that_handed_over(private: Path, vm_process: subprocess.Popen[bytes]) -> None:
    # The harness (task) process hands over and exits; the VM goes on seeing its fabric.
    script = f"""
import sys, uuid
from pathlib import Path
from imagekit.fabric import Fabric, VMIdentity
from imagekit.fabric.keeper import hand_over
from tests.test_fabric_keeper import _profile
fabric = Fabric(_profile(), VMIdentity(uuid.UUID({str(uuid.uuid4())!r}), mac="52:54:00:ab:cd:ef", ip="10.0.0.4"))
fabric.start(Path({os.fspath(private)!r}))
keeper = hand_over(fabric, watch_pid={vm_process.pid}, log_path=Path({os.fspath(private)!r}) / "keeper.log")
print(keeper.pid)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr
    keeper_pid = int(res.stdout.strip())
    try:
        status, _, body = request(private / "wire.sock", "GET", "/?comp=versions", WIRE_HEADERS)
        assert status == 200 and b"<Versions>" in body
        assert request(private / "imds.sock", "GET", IMDS, {"Metadata": "true"})[0] == 200
        vm_process.kill()
        vm_process.wait()
        _wait_until(lambda: process_start(keeper_pid) is None, 30, "the orphaned keeper's exit")
        assert sorted(p.name for p in private.iterdir()) == ["keeper.log"]
        _assert_no_secret((private / "keeper.log").read_text())
    finally:
        if process_start(keeper_pid) is not None:
            os.kill(keeper_pid, signal.SIGKILL)


def test_sigterm_stops_the_keeper_cleanly(
    private: Path, vm_process: subprocess.Popen[bytes], keepers: list[Keeper]
) -> None:
    fabric = _fabric()
    fabric.start(private)
    keeper = hand_over(fabric, watch_pid=vm_process.pid, log_path=private / "keeper.log")
    keepers.append(keeper)
    os.kill(keeper.pid, signal.SIGTERM)
    assert keeper.proc.wait(timeout=30) == 0
    assert vm_process.poll() is None  # only the keeper ended
    assert sorted(p.name for p in private.iterdir()) == ["keeper.log"]
    assert "asked to stop" in (private / "keeper.log").read_text()


def test_handover_file_is_written_0600_and_deleted_by_its_reader(
    private: Path, vm_process: subprocess.Popen[bytes]
) -> None:
    fabric = _fabric()
    fabric.start(private)
    try:
        doc = handover_document(fabric, watch_pid=vm_process.pid)
        path = private / HANDOVER_NAME
        path.write_text("old")
        os.chmod(path, 0o644)
        write_handover(path, doc)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text()) == doc
        assert sorted(p.name for p in private.iterdir()) == sorted([HANDOVER_NAME, "hostga.sock", "imds.sock",
                                                                     "wire.sock"])  # no temp file left
        ho = read_handover(path)
        assert not path.exists()
        assert ho.watch_pid == vm_process.pid and ho.sockdir == private
        assert ho.fabric.profile == fabric.profile and ho.fabric.profile.password == PASSWORD
        assert ho.fabric.profile.custom_data == CUSTOM_DATA and ho.fabric.identity == fabric.identity
        assert documents_digest(ho.fabric) == documents_digest(fabric) == doc["digest"]
    finally:
        fabric.stop()


def test_digest_tells_fabrics_apart() -> None:
    # The keeper's guard against serving a different goal state must be able to notice one.
    a, b = _fabric(), _fabric()
    assert documents_digest(a) == documents_digest(a)
    assert documents_digest(a) != documents_digest(b)  # another vm_uuid: another vmId and container id


def test_a_bad_handover_file_is_refused_without_quoting_it(private: Path) -> None:
    fabric = _fabric()
    fabric.start(private)
    try:
        doc = handover_document(fabric, watch_pid=os.getpid())
    finally:
        fabric.stop()
    doc["profile"]["password"] = "onlyLettersSeCrEt"  # invalid: not complex enough for Azure
    path = private / HANDOVER_NAME
    write_handover(path, doc)
    with pytest.raises(HandoverError) as err:
        read_handover(path)
    assert "profile" in str(err.value) and "SeCrEt" not in str(err.value)
    assert not path.exists()
    path.write_text("{not json")
    with pytest.raises(HandoverError, match="malformed handover file"):
        read_handover(path)
    assert not path.exists()


def test_a_vm_that_is_already_gone_is_not_handed_over(private: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    fabric = _fabric()
    paths = fabric.start(private)
    try:
        with pytest.raises(HandoverError, match="is not running"):
            hand_over(fabric, watch_pid=dead.pid, log_path=private / "keeper.log")
        assert fabric.sockets == paths  # nothing was stopped
        assert request(paths.wire, "GET", "/?comp=versions")[0] == 200
    finally:
        fabric.stop()


def test_a_keeper_that_cannot_bind_fails_clearly_and_leaves_nothing(
    private: Path, vm_process: subprocess.Popen[bytes]
) -> None:
    fabric = _fabric()
    paths = fabric.start(private)
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stop = fabric.stop

    def stop_then_squat() -> None:
        # Someone else binds the WireServer's path between the in-process stop and the keeper's start.
        stop()
        squatter.bind(os.fspath(paths.wire))

    fabric.stop = stop_then_squat  # type: ignore[method-assign]
    try:
        with pytest.raises(HandoverError) as err:
            hand_over(fabric, watch_pid=vm_process.pid, log_path=private / "keeper.log")
        assert "exited (code 1) before serving" in str(err.value)
        assert "already exists" in str(err.value)  # the keeper's own reason, from its log
        assert _processes_naming(os.fspath(private)) == []
        assert not (private / HANDOVER_NAME).exists()
        assert not paths.imds.exists() and not paths.hostga.exists()
        _assert_no_secret((private / "keeper.log").read_text())
    finally:
        squatter.close()


def test_a_keeper_in_a_wrong_directory_fails_clearly(private: Path, vm_process: subprocess.Popen[bytes]) -> None:
    fabric = _fabric()
    fabric.start(private)
    os.chmod(private, 0o755)  # no longer private: the keeper must refuse to serve there
    with pytest.raises(HandoverError) as err:
        hand_over(fabric, watch_pid=vm_process.pid, log_path=private / "keeper.log")
    assert "has mode 755" in str(err.value)
    assert _processes_naming(os.fspath(private)) == []
    assert sorted(p.name for p in private.iterdir()) == ["keeper.log"]


def test_a_keeper_that_is_not_ready_in_time_is_killed(private: Path, vm_process: subprocess.Popen[bytes]) -> None:
    fabric = _fabric()
    fabric.start(private)
    with pytest.raises(HandoverError, match="did not start serving within"):
        hand_over(fabric, watch_pid=vm_process.pid, log_path=private / "keeper.log", timeout=0.001)
    assert _processes_naming(os.fspath(private)) == []
    assert not (private / HANDOVER_NAME).exists()


def test_sweep_leaves_a_kept_vms_dir_with_its_keeper(
    private: Path, vm_process: subprocess.Popen[bytes], keepers: list[Keeper]
) -> None:
    # A kept VM's private dir: its harness (the .owner) is gone, its VM and keeper are not.
    dead = subprocess.Popen(["true"])
    dead.wait()
    vmdir = private / "vm-kept"
    vmdir.mkdir(mode=0o700)
    (vmdir / ".owner").write_text(str(dead.pid))
    (vmdir / "netns.json").write_text(json.dumps({"detach": True}))
    sockdir = vmdir / "fabric"
    sockdir.mkdir(mode=0o700)
    fabric = _fabric()
    paths = fabric.start(sockdir)
    keepers.append(hand_over(fabric, watch_pid=vm_process.pid, log_path=vmdir / "keeper.log"))
    assert sweep_stale(private) == []
    assert request(paths.wire, "GET", "/?comp=versions")[0] == 200
