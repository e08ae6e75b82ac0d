"""A health report must name this VM's container AND its role instance: each id is checked on its own.

The ids come from the goal state the fabric serves (what an agent reads them from), the report body is the
shape WALinuxAgent's wire protocol posts (written out here), and each test changes exactly one id, so
dropping either check in the fabric fails one of them.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from imagekit.config.profile import ProvisioningProfile
from imagekit.fabric import Fabric, SocketPaths, VMIdentity
from tests.unixhttp import UnixHTTPConnection

WIRE_HEADERS = {"x-ms-agent-name": "WALinuxAgent", "x-ms-version": "2012-11-30"}


def _request(sock: Path, method: str, target: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(sock)
    try:
        headers = dict(WIRE_HEADERS, **({"Content-Type": "text/xml; charset=utf-8"} if body else {}))
        conn.request(method, target, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def served(sockdir: Path) -> Iterator[tuple[Fabric, SocketPaths, str, str]]:
    """A running fabric and the (container id, role instance id) its goal state hands the agent."""
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    key = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    profile = ProvisioningProfile(hostname="vm-ids", username="azureuser", ssh_public_keys=(key,))
    identity = VMIdentity(uuid.UUID("0badc0de-1234-5678-9abc-def012345678"), mac="52:54:00:12:34:56", ip="10.0.0.4")
    with Fabric(profile, identity) as fabric:
        paths = fabric.start(sockdir)
        status, body = _request(paths.wire, "GET", "/machine/?comp=goalstate")
        assert status == 200
        gs = ET.fromstring(body)
        container_id = gs.findtext("./Container/ContainerId")
        instance_id = gs.findtext("./Container/RoleInstanceList/RoleInstance/InstanceId")
        assert container_id and instance_id
        yield fabric, paths, container_id, instance_id


def _report(container_id: str, instance_id: str, state: str = "Ready") -> bytes:
    # The body WALinuxAgent posts to /machine?comp=health (wire protocol health report).
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<Health xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">'
        "<GoalStateIncarnation>1</GoalStateIncarnation>"
        f"<Container><ContainerId>{container_id}</ContainerId><RoleInstanceList><Role>"
        f"<InstanceId>{instance_id}</InstanceId><Health><State>{state}</State></Health>"
        "</Role></RoleInstanceList></Container></Health>"
    ).encode()


def _post(paths: SocketPaths, body: bytes) -> int:
    return _request(paths.wire, "POST", "/machine?comp=health", body)[0]


def test_report_with_both_ids_from_the_goal_state_is_accepted(served: tuple[Fabric, SocketPaths, str, str]) -> None:
    """The control: the same body with the right ids counts, so the refusals below are about the ids."""
    fabric, paths, container_id, instance_id = served
    assert _post(paths, _report(container_id, instance_id)) == 200
    assert [r.state for r in fabric.reports()] == ["Ready"]


def test_report_for_another_container_is_refused(served: tuple[Fabric, SocketPaths, str, str]) -> None:
    fabric, paths, container_id, instance_id = served
    other_container = str(uuid.uuid4())
    assert other_container != container_id
    assert _post(paths, _report(other_container, instance_id)) == 400  # the instance id is this VM's
    assert fabric.reports() == []


def test_report_for_another_role_instance_is_refused(served: tuple[Fabric, SocketPaths, str, str]) -> None:
    fabric, paths, container_id, instance_id = served
    for other_instance in (f"{uuid.uuid4()}._vm-ids", instance_id + "x", ""):
        assert _post(paths, _report(container_id, other_instance)) == 400  # the container id is this VM's
    assert fabric.reports() == []
