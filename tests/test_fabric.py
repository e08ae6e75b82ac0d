"""The fabric emulator over its real Unix sockets with plain HTTP clients: endpoints, state, isolation,
hostile input, and the DNS answers. WALinuxAgent's fixtures of real platform responses are the oracle
for document shapes; the agents' own code is exercised in test_fabric_agents.py."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import types
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

import imagekit.fabric
from imagekit.config.profile import ProvisioningProfile
from imagekit.core.errors import ImagekitError, InputError, ProvisioningError
from imagekit.fabric import (
    AgentReportedFailure,
    Fabric,
    Limits,
    ReadyTimeout,
    Service,
    SocketPaths,
    VMIdentity,
    dns_answer,
    dns_names,
)
from tests.unixhttp import UnixHTTPConnection

UUID_A = uuid.UUID("12345678-1234-5678-9abc-def012345678")
UUID_B = uuid.UUID("87654321-4321-8765-cba9-876543210fed")
WIRE_HEADERS = {"x-ms-agent-name": "WALinuxAgent", "x-ms-version": "2012-11-30"}


def _key() -> str:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    return pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " t@x"


def _fabric(hostname: str = "vm-a", vm_uuid: uuid.UUID = UUID_A, ip: str = "10.0.0.4", **kw: Any) -> Fabric:
    profile = ProvisioningProfile(hostname=hostname, username="azureuser", ssh_public_keys=(_key(),))
    return Fabric(profile, VMIdentity(vm_uuid, mac="52:54:00:12:34:56", ip=ip), **kw)


SMALL = Limits(max_body=64 * 1024, read_timeout=1.0, connection_deadline=3.0, max_connections=8)


@pytest.fixture
def running(sockdir: Path) -> Iterator[tuple[Fabric, SocketPaths]]:
    with _fabric(limits=SMALL) as fabric:
        yield fabric, fabric.start(sockdir)


def request(
    sock: Path, method: str, target: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, str, bytes]:
    conn = UnixHTTPConnection(sock)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


def raw(sock: Path, data: bytes, *, shut: bool = True, early_reply: bool = False) -> bytes:
    """Send bytes as they are, return everything the server sends before closing.

    ``early_reply``: the server may answer and hang up before it has read all of ``data`` (a 413 decided
    from the headers). Then sending fails with EPIPE and, as the server closed with unread bytes, reading
    ends in ECONNRESET after its answer instead of EOF; both are expected and the answer is still returned.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    chunks = []
    try:
        s.connect(str(sock))
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            if not early_reply:
                raise
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            if not early_reply:
                raise
        return b"".join(chunks)
    finally:
        s.close()


def _refused(sock: Path) -> bool:
    """True when the server closes a connection without answering a valid request."""
    try:
        answer = raw(sock, b"GET /metadata/versions HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n")
        return answer == b"" or answer.startswith(b"HTTP/1.1 503 ")
    except (ConnectionResetError, BrokenPipeError):
        return True


def _status(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:80]
    return int(reply.split()[1])


def _health_xml(fabric: Fabric, state: str, substatus: str | None = None, description: str = "") -> bytes:
    details = ""
    if substatus is not None:
        details = f"<Details><SubStatus>{substatus}</SubStatus><Description>{description}</Description></Details>"
    return (
        '<?xml version="1.0" encoding="utf-8"?><Health><GoalStateIncarnation>1</GoalStateIncarnation>'
        f"<Container><ContainerId>{fabric.identity.container_id}</ContainerId><RoleInstanceList><Role>"
        f"<InstanceId>{fabric.identity.role_instance_id(fabric.profile.hostname)}</InstanceId>"
        f"<Health><State>{state}</State>{details}</Health></Role></RoleInstanceList></Container></Health>"
    ).encode()


def _post_health(paths: SocketPaths, body: bytes) -> int:
    status, _, _ = request(paths.wire, "POST", "/machine?comp=health", {**WIRE_HEADERS}, body)
    return status


def _element_paths(root: ET.Element, prefix: str = "") -> set[str]:
    here = f"{prefix}/{root.tag}"
    out = {here} | {f"{here}@{a}" for a in root.attrib}
    for child in root:
        out |= _element_paths(child, here)
    return out


# --- WireServer ---


def test_versions_and_goal_state(running: tuple[Fabric, SocketPaths], wa_fixtures: Path) -> None:
    fabric, paths = running
    status, ctype, body = request(paths.wire, "GET", "/?comp=versions")
    assert status == 200 and ctype.startswith("text/xml")
    assert ET.fromstring(body).findtext("Preferred/Version") == "2012-11-30"

    status, _, body = request(paths.wire, "GET", "/machine/?comp=goalstate", WIRE_HEADERS)
    assert status == 200
    ours = ET.fromstring(body)
    # Every element of Azure's no-certificates goal state is there, except the FullConfig link that
    # no agent here fetches.
    oracle = ET.parse(wa_fixtures / "wire" / "goal_state_no_certs.xml").getroot()
    missing = {p for p in _element_paths(oracle) - _element_paths(ours) if "FullConfig" not in p}
    assert not missing
    assert ours.find(".//Certificates") is None  # keys come from the OVF Value and IMDS, see documents.py
    assert ours.findtext("./Container/ContainerId") == fabric.identity.container_id
    assert ours.findtext("./Container/RoleInstanceList/RoleInstance/InstanceId") == f"{fabric.identity.vm_id}._vm-a"


@pytest.mark.parametrize(
    ("kind", "fixture"),
    [
        ("HostingEnvironmentConfig", "hosting_env.xml"),
        ("SharedConfig", "shared_config.xml"),
        ("ExtensionsConfig", "ext_conf_no_extensions-block_blob.xml"),
    ],
)
def test_config_documents_have_what_the_agents_read(
    running: tuple[Fabric, SocketPaths], wa_fixtures: Path, kind: str, fixture: str
) -> None:
    _, paths = running
    _, _, gs = request(paths.wire, "GET", "/machine/?comp=goalstate")
    url = ET.fromstring(gs).findtext(f".//{kind}")
    assert url is not None and url.startswith("http://168.63.129.16:80/machine/")
    status, ctype, body = request(paths.wire, "GET", url.removeprefix("http://168.63.129.16:80"), WIRE_HEADERS)
    assert status == 200 and ctype.startswith("text/xml")
    ours = ET.fromstring(body)
    oracle = ET.parse(wa_fixtures / "wire" / fixture).getroot()
    wanted = {
        p
        for p in _element_paths(oracle)
        if any(k in p for k in ("/Deployment", "/Incarnation", "/Role@", "/Role", "StatusUploadBlob", "GAFamilies"))
    }
    assert wanted and not (wanted - _element_paths(ours))


def test_config_of_another_container_is_not_found(running: tuple[Fabric, SocketPaths]) -> None:
    _, paths = running
    other = f"/machine/{uuid.uuid4()}/x?comp=config&type=sharedConfig&incarnation=1"
    assert request(paths.wire, "GET", other)[0] == 404
    assert request(paths.wire, "GET", "/machine/?comp=certificates")[0] == 404
    assert request(paths.wire, "GET", "/nothing/here")[0] == 404
    assert request(paths.wire, "POST", "/machine/?comp=goalstate", body=b"")[0] == 405


def test_telemetry_and_health_service_are_accepted(running: tuple[Fabric, SocketPaths]) -> None:
    fabric, paths = running
    event = b'<?xml version="1.0"?><TelemetryData version="1.0"><Provider id="x"></Provider></TelemetryData>'
    assert request(paths.wire, "POST", "/machine?comp=telemetrydata", WIRE_HEADERS, event)[0] == 200
    assert request(paths.wire, "POST", "/HealthService", {"Content-Type": "application/json"}, b"{}")[0] == 200
    assert fabric.state.telemetry() == [event]


# --- health reports and waiting ---


def test_not_ready_then_ready(running: tuple[Fabric, SocketPaths]) -> None:
    fabric, paths = running
    assert _post_health(paths, _health_xml(fabric, "NotReady", "Provisioning", "Starting")) == 200
    with pytest.raises(ReadyTimeout):
        fabric.wait_for_ready(0)
    assert str(fabric.last_report) == "NotReady (Provisioning: Starting)"
    assert _post_health(paths, _health_xml(fabric, "Ready")) == 200
    assert fabric.wait_for_ready(0).state == "Ready"
    assert [r.state for r in fabric.reports()] == ["NotReady", "Ready"]


def test_wait_for_ready_wakes_on_a_report_from_another_thread(running: tuple[Fabric, SocketPaths]) -> None:
    fabric, paths = running

    # The poster waits until the harness is already waiting (the request it makes first is the signal).
    def agent() -> None:
        request(paths.wire, "GET", "/machine/?comp=goalstate")
        _post_health(paths, _health_xml(fabric, "Ready"))

    t = threading.Thread(target=agent)
    t.start()
    try:
        assert fabric.wait_for_ready(60).state == "Ready"
    finally:
        t.join()


def test_failure_report_raises_with_the_agents_description(running: tuple[Fabric, SocketPaths]) -> None:
    fabric, paths = running
    text = "Failed to provision: user name is reserved &amp; rejected"
    assert _post_health(paths, _health_xml(fabric, "NotReady", "ProvisioningFailed", text)) == 200
    with pytest.raises(AgentReportedFailure) as info:
        fabric.wait_for_ready(30)
    assert "Failed to provision: user name is reserved & rejected" in str(info.value)
    assert isinstance(info.value, ProvisioningError)


def test_timeout_says_what_was_and_was_not_received(running: tuple[Fabric, SocketPaths]) -> None:
    fabric, paths = running
    request(paths.wire, "GET", "/?comp=versions")
    request(paths.wire, "GET", "/machine/?comp=goalstate")
    _post_health(paths, _health_xml(fabric, "NotReady", "Provisioning", "Starting"))
    with pytest.raises(ReadyTimeout) as info:
        fabric.wait_for_ready(0.05)
    msg = str(info.value)
    assert "did not report Ready within 0.05 s" in msg
    assert "seen: WireServer versions (waagent), goal state, health report" in msg
    assert "not seen: IMDS metadata (cloud-init)" in msg
    assert "last reported state: NotReady (Provisioning: Starting)" in msg


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not xml at all",
        b"<Health><Container>",
        b"<Other/>",
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
        b"<Health>&lol2;</Health>",
        "<Health>\u00ff\u0000</Health>".encode(),
    ],
)
def test_malformed_health_reports_are_refused_and_change_nothing(
    running: tuple[Fabric, SocketPaths], body: bytes
) -> None:
    fabric, paths = running
    assert _post_health(paths, body) == 400
    assert fabric.reports() == []
    assert request(paths.wire, "GET", "/?comp=versions")[0] == 200


def test_reports_for_another_vm_or_with_an_unknown_state_are_refused(running: tuple[Fabric, SocketPaths]) -> None:
    fabric, paths = running
    other = _fabric("vm-b", UUID_B)
    assert _post_health(paths, _health_xml(other, "Ready")) == 400
    assert _post_health(paths, _health_xml(fabric, "Started")) == 400
    assert fabric.reports() == []


# --- HostGAPlugin ---


def test_hostgaplugin(running: tuple[Fabric, SocketPaths]) -> None:
    fabric, paths = running
    assert request(paths.hostga, "GET", "/vmSettings", {"x-ms-version": "2015-09-01"})[0] == 404
    status, _, body = request(paths.hostga, "GET", "/versions")
    assert status == 200 and "2015-09-01" in json.loads(body)
    assert request(paths.hostga, "GET", "/health")[0] == 200
    status_doc = json.dumps({"requestUri": "https://x", "headers": [], "content": "e30="}).encode()
    assert request(paths.hostga, "PUT", "/status", {"Content-Type": "application/json"}, status_doc)[0] == 200
    assert request(paths.hostga, "PUT", "/status", {}, b"{not json")[0] == 400
    assert request(paths.hostga, "GET", "/status")[0] == 405
    assert fabric.state.status_uploads() == [status_doc]


# --- IMDS ---

IMDS = {"Metadata": "true"}


def test_imds_instance(running: tuple[Fabric, SocketPaths], wa_fixtures: Path) -> None:
    fabric, paths = running
    status, ctype, body = request(paths.imds, "GET", "/metadata/instance?api-version=2021-08-01&extended=true", IMDS)
    assert status == 200 and ctype.startswith("application/json")
    doc = json.loads(body)
    oracle = json.loads((wa_fixtures / "imds" / "valid.json").read_text())
    assert set(oracle["compute"]) <= set(doc["compute"])
    nic = doc["network"]["interface"][0]
    assert set(oracle["network"]["interface"][0]) <= set(nic)
    assert nic["macAddress"] == "525400123456"
    assert nic["ipv4"]["ipAddress"][0]["privateIpAddress"] == "10.0.0.4"
    assert nic["ipv4"]["subnet"][0] == {"address": "10.0.0.0", "prefix": "24"}
    compute = doc["compute"]
    assert compute["vmId"] == fabric.identity.vm_id
    assert compute["osProfile"] == {
        "adminUsername": "azureuser",
        "computerName": "vm-a",
        "disablePasswordAuthentication": "true",
    }
    assert [k["keyData"] for k in compute["publicKeys"]] == list(fabric.profile.ssh_public_keys)
    assert doc["extended"]["compute"] == {"hasCustomData": False, "ppsType": "None"}
    assert "password" not in body.decode().lower().replace("disablepasswordauthentication", "")


def test_imds_versions_subpaths_and_formats(running: tuple[Fabric, SocketPaths]) -> None:
    _, paths = running
    old = json.loads(request(paths.imds, "GET", "/metadata/instance?api-version=2019-06-01&extended=true", IMDS)[2])
    assert "extended" not in old  # extended metadata starts with 2021-03-01
    status, _, body = request(paths.imds, "GET", "/metadata/instance/compute?api-version=2018-02-01", IMDS)
    assert status == 200 and json.loads(body)["name"] == "vm-a"
    status, ctype, body = request(
        paths.imds, "GET", "/metadata/instance/network/interface/0/macAddress?api-version=2021-08-01&format=text", IMDS
    )
    assert (status, body) == (200, b"525400123456") and ctype.startswith("text/plain")
    assert request(paths.imds, "GET", "/metadata/instance/compute?api-version=2021-08-01&format=text", IMDS)[0] == 400
    assert request(paths.imds, "GET", "/metadata/instance/compute/nope?api-version=2021-08-01", IMDS)[0] == 404
    assert request(paths.imds, "GET", "/metadata/instance/network/interface/7?api-version=2021-08-01", IMDS)[0] == 404
    versions = json.loads(request(paths.imds, "GET", "/metadata/versions", IMDS)[2])["apiVersions"]
    assert "2021-08-01" in versions and "2019-06-01" in versions


def test_imds_refuses_as_azure_does(running: tuple[Fabric, SocketPaths]) -> None:
    _, paths = running
    status, _, body = request(paths.imds, "GET", "/metadata/instance?api-version=2021-08-01")
    assert status == 400 and json.loads(body) == {"error": "Bad request. Required metadata header not specified"}
    status, _, body = request(paths.imds, "GET", "/metadata/instance?api-version=2021-08-01", {"Metadata": "false"})
    assert status == 400
    for bad in ("", "?api-version=2099-01-01", "?api-version=latest"):
        status, _, body = request(paths.imds, "GET", f"/metadata/instance{bad}", IMDS)
        err = json.loads(body)
        assert status == 400 and "api-version is invalid" in err["error"]
        assert err["newest-versions"][0] == "2023-07-01"
    assert request(paths.imds, "GET", "/metadata/identity/oauth2/token?api-version=2018-02-01", IMDS)[0] == 404
    assert request(paths.imds, "GET", "/latest/meta-data/", IMDS)[0] == 404
    assert request(paths.imds, "POST", "/metadata/instance?api-version=2021-08-01", IMDS, b"")[0] == 405


def test_imds_api_versions_can_be_restricted(sockdir: Path) -> None:
    with _fabric(imds_api_versions=("2019-06-01",)) as fabric:
        paths = fabric.start(sockdir)
        assert request(paths.imds, "GET", "/metadata/instance?api-version=2021-08-01&extended=true", IMDS)[0] == 400
        assert request(paths.imds, "GET", "/metadata/instance?api-version=2019-06-01", IMDS)[0] == 200


def test_wait_for_request(running: tuple[Fabric, SocketPaths]) -> None:
    fabric, paths = running
    with pytest.raises(ReadyTimeout, match="no imds request for /metadata/instance"):
        fabric.wait_for_request(Service.IMDS, "/metadata/instance", 0)
    request(paths.imds, "GET", "/metadata/instance?api-version=2021-08-01", IMDS)
    rec = fabric.wait_for_request(Service.IMDS, "/metadata/instance", 0)
    assert (rec.method, rec.status) == ("GET", 200)


def test_an_app_error_is_a_500_and_the_server_keeps_serving(sockdir: Path) -> None:
    from imagekit.fabric.http import Request, Response, serve_unix

    served: list[tuple[str, str, int]] = []

    def app(req: Request) -> Response:
        if req.path == "/boom":
            raise RuntimeError("bug in a route")
        return Response(200, b"ok")

    srv = serve_unix(str(sockdir / "t.sock"), app, lambda m, p, s: served.append((m, p, s)), SMALL, "t", "wire")
    try:
        status, _, body = request(sockdir / "t.sock", "GET", "/boom")
        assert (status, body) == (500, b"internal error\n")
        assert request(sockdir / "t.sock", "GET", "/fine")[0] == 200
        assert served == [("GET", "/boom", 500), ("GET", "/fine", 200)]
    finally:
        srv.close()
    assert not (sockdir / "t.sock").exists()


# --- requests are recorded, without bodies ---


def test_requests_are_recorded_without_bodies(running: tuple[Fabric, SocketPaths], caplog: Any) -> None:
    fabric, paths = running
    caplog.set_level("DEBUG", logger="imagekit.fabric")
    secret = b"s3cr3t-custom-data"
    request(paths.wire, "POST", "/machine?comp=telemetrydata", WIRE_HEADERS, secret)
    request(paths.imds, "GET", "/metadata/instance?api-version=2021-08-01", IMDS)
    recs = fabric.requests()
    assert [(r.service, r.method, r.path, r.status) for r in recs] == [
        (Service.WIRE, "POST", "/machine?comp=telemetrydata", 200),
        (Service.IMDS, "GET", "/metadata/instance?api-version=2021-08-01", 200),
    ]
    assert "s3cr3t" not in caplog.text and "wire POST /machine?comp=telemetrydata -> 200" in caplog.text
    assert "s3cr3t" not in repr(recs)


# --- hostile and malformed input ---


def test_garbage_and_malformed_requests_get_400_and_the_server_keeps_serving(
    running: tuple[Fabric, SocketPaths],
) -> None:
    fabric, paths = running
    assert _status(raw(paths.wire, b"\x00\xff\xfe garbage \x01\x02\r\n\r\n")) == 400
    assert _status(raw(paths.wire, b"GET\r\n\r\n")) == 400
    assert _status(raw(paths.wire, b"GET / HTTP/9.9\r\nHost: x\r\n\r\n")) == 505
    assert _status(raw(paths.wire, b"GET /?comp=versions HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")) == 400
    assert _status(raw(paths.wire, b"GET /?comp=versions HTTP/1.1\r\n\r\n")) == 400  # HTTP/1.1 needs a Host
    assert _status(raw(paths.wire, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")) == 414
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    assert _status(raw(paths.wire, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")) == 431
    long_header = b"X-Long: " + b"v" * 70000 + b"\r\n"
    assert _status(raw(paths.wire, b"GET / HTTP/1.1\r\nHost: x\r\n" + long_header + b"\r\n")) == 431
    assert _status(raw(paths.wire, b"GET /?comp=versions\r\n")) == 400  # HTTP/0.9 is not served
    # Bytes that are not UTF-8 in the path, and control characters, never reach records raw.
    assert _status(raw(paths.wire, b"GET /\xff\xfe%00%0a?comp=x HTTP/1.1\r\nHost: x\r\n\r\n")) in (400, 404)
    assert all(ch.isprintable() for r in fabric.requests() for ch in r.path)
    assert raw(paths.wire, b"") == b""  # connect and close: nothing to answer, nothing breaks
    assert request(paths.wire, "GET", "/?comp=versions")[0] == 200
    assert fabric.reports() == []


def test_body_limits(running: tuple[Fabric, SocketPaths]) -> None:
    fabric, paths = running
    head = b"POST /machine?comp=health HTTP/1.1\r\nHost: x\r\n"
    # Too large: refused from the header alone, the body is never read.
    assert _status(raw(paths.wire, head + b"Content-Length: %d\r\n\r\n" % (10 * 1024 * 1024), shut=False)) == 413
    assert _status(raw(paths.wire, head + b"Content-Length: -5\r\n\r\n")) == 400
    assert _status(raw(paths.wire, head + b"Content-Length: 12abc\r\n\r\n")) == 400
    assert _status(raw(paths.wire, head + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")) == 400
    assert _status(raw(paths.wire, head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")) == 411
    # Shorter than announced, then the client stops sending: refused, and recorded.
    assert _status(raw(paths.wire, head + b"Content-Length: 100\r\n\r\nshort")) == 400
    assert fabric.requests()[-1].status == 400
    # A real over-limit body: answered 413 from the header; the server does not wait for the body, so the
    # client may find the connection closed while still sending it.
    big = b"x" * (SMALL.max_body + 1)
    put = b"PUT /status HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big)
    assert _status(raw(paths.hostga, put + big, early_reply=True)) == 413
    assert fabric.reports() == [] and fabric.state.status_uploads() == []
    assert request(paths.wire, "GET", "/?comp=versions")[0] == 200


def test_an_idle_or_trickling_connection_is_cut_and_others_are_served(running: tuple[Fabric, SocketPaths]) -> None:
    _, paths = running
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    trickle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        idle.settimeout(60)
        trickle.settimeout(60)
        idle.connect(str(paths.wire))
        trickle.connect(str(paths.wire))
        idle.sendall(b"GET /?comp=versions HTTP/1.1\r\n")  # and then nothing
        # While both are held open, other clients are served.
        assert request(paths.wire, "GET", "/?comp=versions")[0] == 200
        # A header byte at a time, each within the read timeout: only the connection deadline ends it.
        header = b"GET /?comp=versions HTTP/1.1\r\nX-Slow: " + b"a" * 1000
        closed_early = False
        for byte in header:
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                closed_early = True
                break
            time.sleep(SMALL.read_timeout / 4)
        assert closed_early, "the connection deadline did not cut the trickling client"
        # Cut by the server (read timeout): half a request is answered 408, then closed.
        assert idle.recv(100).startswith(b"HTTP/1.1 408 ")
    finally:
        idle.close()
        trickle.close()
    assert request(paths.wire, "GET", "/?comp=versions")[0] == 200


def test_connection_cap(sockdir: Path) -> None:
    limits = Limits(read_timeout=30.0, connection_deadline=60.0, max_connections=3)
    with _fabric(limits=limits) as fabric:
        paths = fabric.start(sockdir)
        held = []
        try:
            for _ in range(3):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(30)
                s.connect(str(paths.imds))
                held.append(s)
            # The server accepts each of them in turn; one more is over the cap and is closed unanswered.
            deadline = time.monotonic() + 30
            while True:
                assert time.monotonic() < deadline, "the connection over the cap was never refused"
                if _refused(paths.imds):
                    break
        finally:
            for s in held:
                s.close()
        # Once the held connections are gone the server serves again; until it has noticed they closed,
        # a new connection may still be over the cap and closed unanswered.
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, "the server never served again after the cap was freed"
            try:
                if request(paths.imds, "GET", "/metadata/versions", IMDS)[0] == 200:
                    break
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                time.sleep(0.05)


# --- a hostile guest (issue 9): every limit below is written here, not read from the product ---


def test_what_a_guest_makes_the_harness_keep_and_log_is_bounded(sockdir: Path, caplog: Any) -> None:
    caplog.set_level("INFO", logger="imagekit.fabric")
    with _fabric() as fabric:  # default limits: bodies up to 1 MiB
        paths = fabric.start(sockdir)
        big = "d" * (1000 * 1000)
        for _ in range(40):
            assert _post_health(paths, _health_xml(fabric, "NotReady", "Provisioning", big)) == 200
        for _ in range(40):
            status, _, _ = request(paths.wire, "POST", "/machine?comp=telemetrydata", WIRE_HEADERS, b"t" * 1000_000)
            assert status == 200
        kept = fabric.reports()
        # 40 MB of descriptions were sent; at most 2 MiB of them may be kept, each cut with a marker.
        assert sum(len(r.description or "") for r in kept) <= 2 * 1024 * 1024
        assert kept and all("truncated" in (r.description or "") for r in kept)
        assert sum(len(b) for b in fabric.state.telemetry()) <= 8 * 1024 * 1024
        assert fabric.state.stored_bytes() <= 16 * 1024 * 1024
    # The log says each report in a bounded line: 40 reports, at most 4 KiB each.
    report_lines = [r.getMessage() for r in caplog.records if "reported" in r.getMessage()]
    assert len(report_lines) == 40 and all(len(line) <= 4096 for line in report_lines)


def _entity_bomb(fabric: Fabric) -> str:
    entities = '<!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">' + "".join(
        f'<!ENTITY {n} "{("&" + p + ";") * 10}">' for p, n in zip("abcd", "bcde", strict=True)
    )
    doc = _health_xml(fabric, "NotReady", "Provisioning", "&e;").decode()
    doc = doc.replace('<?xml version="1.0" encoding="utf-8"?>', "")
    return f"<!DOCTYPE Health [{entities}]>{doc}"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8"])
def test_a_dtd_is_refused_whatever_the_encoding(running: tuple[Fabric, SocketPaths], encoding: str) -> None:
    fabric, paths = running
    text = f'<?xml version="1.0" encoding="{encoding.upper()}"?>' + _entity_bomb(fabric)
    body = text.encode(encoding)
    if encoding == "utf-16-be":
        body = b"\xfe\xff" + body  # with its byte-order mark, as XML requires of UTF-16
    assert len(body) < SMALL.max_body
    assert _post_health(paths, body) == 400
    assert fabric.reports() == []


@pytest.mark.parametrize("encoding", ["x-no-such-encoding", "shift_jis", "utf-32", "big5"])
def test_a_health_report_in_an_unknown_or_multibyte_encoding_is_a_400(
    running: tuple[Fabric, SocketPaths], encoding: str
) -> None:
    fabric, paths = running
    body = _health_xml(fabric, "Ready").replace(b'encoding="utf-8"', f'encoding="{encoding}"'.encode())
    status, _, answer = request(paths.wire, "POST", "/machine?comp=health", WIRE_HEADERS, body)
    assert status == 400 and b"encoding" in answer
    assert fabric.reports() == []


@pytest.mark.parametrize("length", ["²".encode(), "١٢".encode(), b"9" * 5000, b"0x10", b"+5"])
def test_a_content_length_of_other_than_ascii_digits_or_absurdly_long_is_a_recorded_400(
    running: tuple[Fabric, SocketPaths], length: bytes
) -> None:
    fabric, paths = running
    head = b"POST /machine?comp=health HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\nhello"
    assert _status(raw(paths.wire, head)) == 400
    assert fabric.requests()[-1].status == 400
    assert request(paths.wire, "GET", "/?comp=versions")[0] == 200


@pytest.mark.parametrize("index", ["%C2%B2", "%D9%A1", "9" * 5000, "-1", "0x0"])
def test_imds_list_indexes_that_are_not_small_ascii_numbers_are_not_found(
    running: tuple[Fabric, SocketPaths], index: str
) -> None:
    _, paths = running
    target = f"/metadata/instance/network/interface/{index}?api-version=2021-02-01"
    status, ctype, body = request(paths.imds, "GET", target, IMDS)
    assert status == 404 and ctype.startswith("application/json") and "error" in json.loads(body)
    ok = request(paths.imds, "GET", "/metadata/instance/network/interface/0?api-version=2021-02-01", IMDS)
    assert ok[0] == 200 and "macAddress" in json.loads(ok[2])


def test_deeply_nested_status_json_is_a_400(running: tuple[Fabric, SocketPaths]) -> None:
    fabric, paths = running
    body = b'{"content": ' + b"[" * 30000 + b"]" * 30000 + b"}"
    assert len(body) < SMALL.max_body
    status, _, _ = request(paths.hostga, "PUT", "/status", {}, body)
    assert status == 400
    assert fabric.state.status_uploads() == []


def test_imds_refuses_a_request_carrying_x_forwarded_for(running: tuple[Fabric, SocketPaths]) -> None:
    # Azure's IMDS documentation, "Security and authentication": requests must not contain an
    # X-Forwarded-For header; any that does is rejected.
    _, paths = running
    target = "/metadata/instance?api-version=2021-02-01"
    for value in ("10.0.0.9", "", "169.254.169.254, 10.1.1.1"):
        status, ctype, body = request(paths.imds, "GET", target, {**IMDS, "X-Forwarded-For": value})
        assert status == 400 and ctype.startswith("application/json") and "error" in json.loads(body)
    assert request(paths.imds, "GET", target, IMDS)[0] == 200


def test_guest_text_cannot_forge_a_log_line(running: tuple[Fabric, SocketPaths], caplog: Any) -> None:
    fabric, paths = running
    caplog.set_level("DEBUG", logger="imagekit.fabric")
    forged = "Starting\n2026-01-01 00:00:00 I vm-a: the guest agent reported Ready\r\u2028\u0085x"
    assert _post_health(paths, _health_xml(fabric, "NotReady", "Provisioning", forged)) == 200
    bad_id = _health_xml(fabric, "Ready").replace(
        fabric.identity.container_id.encode(), b"x\nthe guest agent reported Ready"
    )
    assert _post_health(paths, bad_id) == 400
    messages = [r.getMessage() for r in caplog.records]
    assert any("reported NotReady" in m for m in messages)
    for m in messages:
        assert not any(ch in m for ch in "\n\r\u2028\u0085"), m
    # The record itself keeps the agent's text as XML delivers it (line ends normalized), for the harness.
    assert fabric.last_report is not None and fabric.last_report.description == forged.replace("\r", "\n")


def test_a_burst_of_64_concurrent_requests_is_served(sockdir: Path) -> None:
    import asyncio

    with _fabric() as fabric:
        paths = fabric.start(sockdir)

        async def one() -> bytes:
            # Non-blocking connects, as the namespace relay makes them: a full backlog fails at once.
            r, w = await asyncio.open_unix_connection(str(paths.wire))
            w.write(b"GET /?comp=versions HTTP/1.1\r\nHost: 168.63.129.16\r\n\r\n")
            data = await asyncio.wait_for(r.read(), 30)
            w.close()
            return data

        async def burst() -> list[bytes | BaseException]:
            return await asyncio.gather(*(one() for _ in range(64)), return_exceptions=True)

        answers = asyncio.run(burst())
    failed = [a for a in answers if not (isinstance(a, bytes) and a.startswith(b"HTTP/1.1 200 "))]
    assert failed == [], f"{len(failed)} of 64 failed: {failed[:3]}"


def test_trickling_connections_do_not_stop_the_server(sockdir: Path) -> None:
    # 48 clients each send a request head a byte at a time, within the read timeout, and never finish.
    limits = Limits(read_timeout=5.0, connection_deadline=120.0)
    with _fabric(limits=limits) as fabric:
        paths = fabric.start(sockdir)
        stop = threading.Event()
        held: list[socket.socket] = []
        for _ in range(48):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(str(paths.wire))
            held.append(s)

        def trickle() -> None:
            while not stop.is_set():
                for s in held:
                    with contextlib.suppress(OSError):
                        s.send(b"G")
                stop.wait(0.5)

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        try:
            time.sleep(1.0)  # let the server accept them all
            status, _, body = request(paths.wire, "GET", "/machine/?comp=goalstate")
            assert status == 200 and b"<GoalState" in body
            status, _, _ = request(paths.imds, "GET", "/metadata/instance?api-version=2021-02-01", IMDS)
            assert status == 200
        finally:
            stop.set()
            t.join()
            for s in held:
                s.close()


def test_a_request_head_must_arrive_within_the_header_deadline(sockdir: Path) -> None:
    # Each byte within the read timeout, but the head as a whole takes longer than header_timeout.
    limits = Limits(read_timeout=2.0, header_timeout=1.0, connection_deadline=60.0)
    with _fabric(limits=limits) as fabric:
        paths = fabric.start(sockdir)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect(str(paths.wire))
            cut = False
            for byte in b"GET /?comp=versions HTTP/1.1\r\nX-Slow: " + b"a" * 300:
                try:
                    s.send(bytes([byte]))
                except OSError:
                    cut = True
                    break
                time.sleep(0.1)
            assert cut, "a head trickled over 30 s was not cut by a 1 s header deadline"
        finally:
            s.close()


def test_connections_over_the_cap_are_refused_at_once_with_503(sockdir: Path) -> None:
    limits = Limits(read_timeout=30.0, connection_deadline=60.0, max_connections=4)
    with _fabric(limits=limits) as fabric:
        paths = fabric.start(sockdir)
        held = []
        try:
            for _ in range(4):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(paths.wire))
                held.append(s)
            time.sleep(0.5)  # accepted by the server
            answer = raw(paths.wire, b"GET /?comp=versions HTTP/1.1\r\nHost: x\r\n\r\n", early_reply=True)
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert fabric.requests()[-1].status == 503
        finally:
            for s in held:
                s.close()


# --- lifecycle and isolation ---


def test_two_fabrics_share_nothing() -> None:
    d1, d2 = Path(tempfile.mkdtemp(prefix="ikf-")), Path(tempfile.mkdtemp(prefix="ikf-"))
    try:
        with _fabric("vm-a", UUID_A, ip="10.0.0.4") as a, _fabric("vm-b", UUID_B, ip="10.0.0.5") as b:
            pa, pb = a.start(d1), b.start(d2)
            gs_a = ET.fromstring(request(pa.wire, "GET", "/machine/?comp=goalstate")[2])
            gs_b = ET.fromstring(request(pb.wire, "GET", "/machine/?comp=goalstate")[2])
            assert gs_a.findtext(".//ContainerId") != gs_b.findtext(".//ContainerId")
            md_b = json.loads(request(pb.imds, "GET", "/metadata/instance?api-version=2021-08-01", IMDS)[2])
            assert (
                md_b["compute"]["name"] == "vm-b"
                and md_b["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"] == "10.0.0.5"
            )
            # B's report sent to A is refused; A's own report lands only in A.
            assert _post_health(pa, _health_xml(b, "Ready")) == 400
            assert _post_health(pa, _health_xml(a, "Ready")) == 200
            assert a.wait_for_ready(0).state == "Ready"
            assert b.reports() == [] and b.last_report is None
            assert {r.path for r in b.requests()} == {
                "/machine/?comp=goalstate",
                "/metadata/instance?api-version=2021-08-01",
            }
            a.stop()
            assert not any(p.exists() for p in (pa.wire, pa.hostga, pa.imds))
            assert request(pb.wire, "GET", "/?comp=versions")[0] == 200
    finally:
        shutil.rmtree(d1, ignore_errors=True)
        shutil.rmtree(d2, ignore_errors=True)


def test_no_module_level_mutable_state() -> None:
    # Cross-VM leaks are impossible by construction: nothing mutable lives outside a Fabric instance.
    mutable = (list, dict, set, bytearray)
    for name in ("dns", "documents", "fabric", "http", "identity", "services", "state"):
        module = getattr(imagekit.fabric, name, None) or __import__(f"imagekit.fabric.{name}", fromlist=["x"])
        assert isinstance(module, types.ModuleType)
        found = [k for k, v in vars(module).items() if isinstance(v, mutable) and not k.startswith("__")]
        assert not found, f"imagekit.fabric.{name} has module-level mutable state: {found}"


def test_start_checks_the_socket_directory(sockdir: Path) -> None:
    fabric = _fabric()
    with pytest.raises(InputError, match="does not exist"):
        fabric.start(sockdir / "missing")
    os.chmod(sockdir, 0o755)
    with pytest.raises(InputError, match="has mode 755") as info:
        fabric.start(sockdir)
    assert "0700" in str(info.value)
    os.chmod(sockdir, 0o700)
    (sockdir / "wire.sock").write_text("")
    with pytest.raises(InputError, match="already exists"):
        fabric.start(sockdir)
    (sockdir / "wire.sock").unlink()
    with fabric:
        paths = fabric.start(sockdir)
        assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in (paths.wire, paths.hostga, paths.imds))
        with pytest.raises(ImagekitError, match="already serving"):
            fabric.start(sockdir)
    assert list(sockdir.iterdir()) == []  # the context manager stopped it and removed the sockets
    fabric.stop()  # idempotent


def test_serve_tcp(sockdir: Path) -> None:
    with _fabric() as fabric:
        host, port = fabric.serve_tcp("127.0.0.1", 0, Service.WIRE)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        try:
            conn.request("GET", "/?comp=versions")
            assert conn.getresponse().status == 200
        finally:
            conn.close()
    assert fabric.requests()[0].path == "/?comp=versions"


# --- identity ---


def test_identity_derivations() -> None:
    bios = VMIdentity(UUID_A, mac="52-54-00-AB-CD-EF", ip="192.168.1.10", prefix_len=16)
    assert bios.vm_id == "78563412-3412-7856-9abc-def012345678"  # Gen1: first three fields byte-swapped
    assert VMIdentity(UUID_A, mac="525400abcdef", ip="10.0.0.4", uefi=True).vm_id == str(UUID_A)
    assert bios.mac_imds == "525400ABCDEF" and bios.mac_colon == "52:54:00:ab:cd:ef"
    assert str(bios.subnet) == "192.168.0.0/16"
    assert bios.container_id == VMIdentity(UUID_A, mac="52:54:00:00:00:01", ip="10.0.0.9").container_id
    assert bios.container_id != VMIdentity(UUID_B, mac="52:54:00:00:00:01", ip="10.0.0.9").container_id
    for bad in ({"mac": "52:54:00:ab:cd"}, {"mac": "zz:54:00:ab:cd:ef"}, {"ip": "10.0.0.256"}, {"prefix_len": 0}):
        args: dict[str, Any] = {"mac": "52:54:00:ab:cd:ef", "ip": "10.0.0.4", **bad}
        with pytest.raises(InputError):
            VMIdentity(UUID_A, **args)


# --- DNS ---

NAMES = dns_names("VM-A", "10.0.0.4")


def _ask(name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)
    wire = dns_answer(q.to_wire(), NAMES)
    assert wire is not None
    resp = dns.message.from_wire(wire)
    assert resp.id == q.id and resp.flags & dns.flags.QR
    return resp


def test_dns_resolves_the_vms_own_names() -> None:
    for name in ("vm-a", "VM-A.", "vm-a.internal.cloudapp.net", "Vm-A.Internal.Cloudapp.Net."):
        resp = _ask(name)
        assert resp.rcode() == dns.rcode.NOERROR and resp.flags & dns.flags.AA
        assert [rr.address for rr in resp.answer[0]] == ["10.0.0.4"]
    assert _ask("vm-a", "ANY").answer[0][0].address == "10.0.0.4"
    aaaa = _ask("vm-a", "AAAA")
    assert aaaa.rcode() == dns.rcode.NOERROR and aaaa.answer == []
    ptr = _ask(dns.reversename.from_address("10.0.0.4").to_text(), "PTR")
    assert ptr.answer[0][0].target.to_text() == "vm-a.internal.cloudapp.net."
    assert _ask("vm-a", use_edns=0).answer[0][0].address == "10.0.0.4"


def test_dns_refuses_everything_else() -> None:
    assert _ask("example.com").rcode() == dns.rcode.NXDOMAIN
    assert _ask("vm-b").rcode() == dns.rcode.NXDOMAIN
    assert _ask(dns.reversename.from_address("10.0.0.5").to_text(), "PTR").rcode() == dns.rcode.NXDOMAIN
    assert _ask("vm-a", rdclass="CH").rcode() == dns.rcode.REFUSED
    notify = dns.message.make_query("vm-a", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    wire = dns_answer(notify.to_wire(), NAMES)
    assert wire is not None and dns.message.from_wire(wire).rcode() == dns.rcode.NOTIMP


def test_dns_malformed_queries() -> None:
    assert dns_answer(b"", NAMES) is None
    assert dns_answer(b"\x12\x34\x01", NAMES) is None  # shorter than a header: nothing to answer
    junk = b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff\xff"
    reply = dns_answer(junk, NAMES)
    assert reply is not None and reply[:2] == b"\xbe\xef"
    assert dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR
    response = dns.message.make_response(dns.message.make_query("vm-a", "A"))
    assert dns_answer(response.to_wire(), NAMES) is None  # never answer an answer (no loops)
    two = dns.message.make_query("vm-a", "A")
    two.question.append(two.question[0])
    reply = dns_answer(two.to_wire(), NAMES)
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR
    with pytest.raises(InputError, match="not an IPv4 address"):
        dns_answer(dns.message.make_query("x", "A").to_wire(), {"x": "not-an-ip"})


def test_fabric_dns_names() -> None:
    fabric = _fabric("vm-a", ip="10.0.0.7")
    reply = fabric.dns_answer(dns.message.make_query("vm-a.internal.cloudapp.net", "A").to_wire())
    assert reply is not None
    assert dns.message.from_wire(reply).answer[0][0].address == "10.0.0.7"


def test_a_request_flood_does_not_erase_what_the_agent_fetched_first() -> None:
    """A guest that sends more requests than are kept must not make the harness forget (and then wrongly
    report as 'not seen') the goal-state fetch that came before the flood."""
    from imagekit.fabric.state import MAX_RECORDS, FabricState, RequestRecord, Service

    state = FabricState()
    state.record_request(RequestRecord(Service.WIRE, "GET", "/machine/?comp=goalstate", 200, 1.0))
    for i in range(MAX_RECORDS + 50):
        state.record_request(RequestRecord(Service.WIRE, "GET", "/flood", 404, 2.0 + i))
    assert all(r.path == "/flood" for r in state.requests())  # the goal-state record left the window
    assert state.wait_for_request(Service.WIRE, "/machine/?comp=goalstate", timeout=0).path.endswith("goalstate")
    with pytest.raises(ReadyTimeout) as exc:
        state.wait_for_ready(timeout=0)
    seen = str(exc.value).split("seen: ", 1)[1].split("; not seen:")[0]
    assert "goal state" in seen
