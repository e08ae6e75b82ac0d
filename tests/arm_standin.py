"""A local stand-in for Azure Resource Manager (not Azure, and not a general ARM emulator): just the
Microsoft.Compute gallery resources ``invoke publish`` touches, over HTTPS on loopback.

Azure Resource Manager cannot run on this machine, so the gallery step is tested against this server, with
the real azure-mgmt-compute SDK pointed at it (its base URL, ``connection_verify`` set to this server's
self-signed certificate, and a test bearer token). HTTPS rather than HTTP because azure-core's bearer token
policy refuses to send a token over plain HTTP, which is the right behaviour to keep under test.

Each request is checked against the REST API's shape (``Microsoft.Compute/galleries``, ``.../images``,
``.../images/{name}/versions``): the ``api-version`` query parameter, a bearer token, the required fields of
an image definition and an image version and their allowed values. It answers as ARM does, with ARM's error
body ``{"error": {"code", "message"}}``: 400 for a malformed body, 401 without the token, 404 for a missing
resource group, gallery or parent image, 409 for a conflicting change or an operation still running. A PUT
is a long-running operation: 201 (created) or 200 (updated) with an ``Azure-AsyncOperation`` header whose
URL reports ``InProgress`` for ``polls_in_progress`` polls, then ``Succeeded`` — or ``Failed`` with an error
for a version whose source blob the test marked bad. Every request is recorded for the tests to look at.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import ssl
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_VERSIONS = {"2026-03-03", "2025-03-03", "2024-03-03", "2023-07-03"}
TOKEN = "standin-test-token"
_NAME = r"[^/]+"
_BASE = rf"/subscriptions/(?P<sub>{_NAME})/resourceGroups/(?P<rg>{_NAME})/providers/Microsoft\.Compute"
GALLERY_RE = re.compile(rf"^{_BASE}/galleries/(?P<gallery>{_NAME})$", re.I)
IMAGE_RE = re.compile(rf"^{_BASE}/galleries/(?P<gallery>{_NAME})/images/(?P<image>{_NAME})$", re.I)
VERSION_RE = re.compile(rf"^{_BASE}/galleries/(?P<gallery>{_NAME})/images/(?P<image>{_NAME})/versions/"
                        rf"(?P<version>{_NAME})$", re.I)
OP_RE = re.compile(rf"^/subscriptions/(?P<sub>{_NAME})/providers/Microsoft\.Compute/locations/(?P<loc>{_NAME})/"
                   rf"operations/(?P<op>{_NAME})$", re.I)
_VERSION_NAME = re.compile(r"^(0|[1-9][0-9]{0,9})\.(0|[1-9][0-9]{0,9})\.(0|[1-9][0-9]{0,9})$")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    status: int


@dataclass
class Operation:
    resource_key: str
    polls_left: int
    fail: dict[str, str] | None = None
    status: str = "InProgress"


@dataclass
class State:
    resource_groups: set[str] = field(default_factory=set)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # lower-cased id -> resource JSON
    operations: dict[str, Operation] = field(default_factory=dict)
    bad_blobs: dict[str, str] = field(default_factory=dict)  # source URI -> why its version fails
    polls_in_progress: int = 1
    requests: list[Recorded] = field(default_factory=list)


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _need(obj: Any, path: str) -> Any:
    """``obj``'s value at the dotted ``path``; a 400 naming the missing property if absent."""
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or cur.get(part) in (None, ""):
            raise ArmError(400, "InvalidParameter", f"Required parameter '{path}' is missing (null).")
        cur = cur[part]
    return cur


def _one_of(value: Any, allowed: tuple[str, ...], name: str) -> None:
    if str(value).lower() not in {a.lower() for a in allowed}:
        raise ArmError(400, "InvalidParameter",
                       f"The value '{value}' of parameter '{name}' is not allowed. Allowed values are "
                       f"'{', '.join(allowed)}'.")


class StandIn:
    """The server: ``start()``, then point the SDK at ``base_url`` with ``ca_file`` and :data:`TOKEN`."""

    def __init__(self) -> None:
        self.state = State()
        self.lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="arm-standin-")
        self.ca_file = Path(self._tmp.name) / "cert.pem"
        key_file = Path(self._tmp.name) / "key.pem"
        _self_signed(self.ca_file, key_file)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.ca_file, key_file)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.base_url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> StandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._tmp.cleanup()

    # -- what a test sets up ---------------------------------------------------------------------------

    def add_gallery(self, sub: str, rg: str, name: str, location: str = "westeurope") -> None:
        self.state.resource_groups.add(f"{sub}/{rg}".lower())
        rid = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/galleries/{name}"
        self.state.resources[rid.lower()] = {
            "id": rid, "name": name, "type": "Microsoft.Compute/galleries", "location": location,
            "properties": {"provisioningState": "Succeeded", "identifier": {"uniqueName": f"{sub}-{name.upper()}"}},
        }

    def requests(self, method: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.state.requests if method is None or r.method == method]

    def resource(self, rid: str) -> dict[str, Any] | None:
        with self.lock:
            return self.state.resources.get(rid.lower())

    # -- the API ---------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any,
               body: Any) -> tuple[int, dict[str, str], Any]:
        auth = headers.get("Authorization", "")
        if auth != f"Bearer {TOKEN}":
            raise ArmError(401, "AuthenticationFailed" if auth else "AuthenticationFailedMissingToken",
                           "Authentication failed. The 'Authorization' header is missing or not a valid bearer "
                           "token.")
        versions = query.get("api-version", [])
        if not versions:
            raise ArmError(400, "MissingApiVersionParameter",
                           "The api-version query parameter (?api-version=) is required for all requests.")
        if versions[0] not in API_VERSIONS:
            raise ArmError(400, "InvalidApiVersionParameter",
                           f"The api-version '{versions[0]}' is invalid. The supported versions are "
                           f"'{', '.join(sorted(API_VERSIONS))}'.")
        if m := OP_RE.match(path):
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", f"The method {method} is not allowed on an operation.")
            return self._operation(m["op"])
        for regex, kind in ((VERSION_RE, "version"), (IMAGE_RE, "image"), (GALLERY_RE, "gallery")):  # noqa: B007
            if m := regex.match(path):
                break
        else:
            raise ArmError(404, "InvalidResourceType", f"The resource type could not be found: {path}")
        if f"{m['sub']}/{m['rg']}".lower() not in self.state.resource_groups:
            raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{m['rg']}' could not be found.")
        key = path.lower()
        if method == "GET":
            res = self.state.resources.get(key)
            if res is None:
                raise ArmError(404, "ResourceNotFound" if kind == "gallery" else "NotFound",
                               self._not_found(kind, m))
            return 200, {}, res
        if method != "PUT":
            raise ArmError(405, "MethodNotAllowed", f"The method {method} is not allowed here.")
        if kind == "gallery":
            raise ArmError(400, "NotSupportedByStandIn", "the stand-in does not create galleries")
        gallery_key = path.lower().split("/images/")[0]
        gallery = self.state.resources.get(gallery_key)
        if gallery is None:
            raise ArmError(404, "ParentResourceNotFound",
                           f"Can not perform requested operation on nested resource. Parent resource "
                           f"'{m['gallery']}' not found.")
        if not isinstance(body, dict):
            raise ArmError(400, "InvalidRequestContent", "The request content was invalid and could not be "
                                                         "deserialized.")
        location = _need(body, "location")
        if str(location).lower() != gallery["location"].lower():
            raise ArmError(400, "InvalidParameter", f"The location '{location}' of the resource must match the "
                                                    f"gallery's location '{gallery['location']}'.")
        if kind == "image":
            res = self._check_image(m, body)
            ident = {k: str(v).lower() for k, v in res["properties"]["identifier"].items()}
            for other_key, other in self.state.resources.items():
                if (other_key != key and other_key.startswith(gallery_key + "/images/") and "/versions/" not in
                        other_key and {k: str(v).lower() for k, v in
                                       other["properties"]["identifier"].items()} == ident):
                    raise ArmError(409, "Conflict",
                                   f"Gallery image '{other['name']}' already has the publisher, offer and SKU "
                                   f"{'/'.join(ident.values())}; they must be unique in a gallery.")
        else:
            image_key = path.lower().rsplit("/versions/", 1)[0]
            if image_key not in self.state.resources:
                raise ArmError(404, "ParentResourceNotFound",
                               f"Can not perform requested operation on nested resource. Parent resource "
                               f"'{m['gallery']}/{m['image']}' not found.")
            res = self._check_version(m, body)
        existing = self.state.resources.get(key)
        if existing is not None:
            if existing["properties"].get("provisioningState") in ("Creating", "Updating"):
                raise ArmError(409, "OperationNotAllowed",
                               "An operation on this resource is already in progress; retry when it completes.")
            self._immutable(kind, existing, res)
        rid = path
        res.update({"id": rid, "name": rid.rsplit("/", 1)[1],
                    "type": {"image": "Microsoft.Compute/galleries/images",
                             "version": "Microsoft.Compute/galleries/images/versions"}[kind]})
        res["properties"]["provisioningState"] = "Updating" if existing else "Creating"
        self.state.resources[key] = res
        fail = None
        if kind == "version":
            uri = res["properties"]["storageProfile"].get("osDiskImage", {}).get("source", {}).get("uri", "")
            if uri in self.state.bad_blobs:
                fail = {"code": "InvalidParameter", "message": self.state.bad_blobs[uri]}
        op_id = str(uuid.uuid4())
        self.state.operations[op_id] = Operation(resource_key=key, polls_left=self.state.polls_in_progress,
                                                 fail=fail)
        op_url = (f"{self.base_url}/subscriptions/{m['sub']}/providers/Microsoft.Compute/locations/"
                  f"{gallery['location']}/operations/{op_id}?api-version={versions[0]}")
        return (200 if existing else 201), {"Azure-AsyncOperation": op_url, "Retry-After": "0"}, res

    def _not_found(self, kind: str, m: re.Match[str]) -> str:
        if kind == "gallery":
            return (f"The Resource 'Microsoft.Compute/galleries/{m['gallery']}' under resource group '{m['rg']}' "
                    "was not found.")
        if kind == "image":
            return f"The gallery image {m['gallery']}/{m['image']} is not found."
        return f"The gallery image version {m['gallery']}/{m['image']}/{m['version']} is not found."

    def _check_image(self, m: re.Match[str], body: dict[str, Any]) -> dict[str, Any]:
        _one_of(_need(body, "properties.osType"), ("Windows", "Linux"), "osType")
        _one_of(_need(body, "properties.osState"), ("Generalized", "Specialized"), "osState")
        for part in ("publisher", "offer", "sku"):
            _need(body, f"properties.identifier.{part}")
        hv = body["properties"].get("hyperVGeneration")
        if hv is not None:
            _one_of(hv, ("V1", "V2"), "hyperVGeneration")
        for f in body["properties"].get("features") or []:
            if f.get("name") == "SecurityType" and str(hv).upper() != "V2":
                raise ArmError(400, "InvalidParameter", "SecurityType feature requires hyperVGeneration V2.")
        out: dict[str, Any] = json.loads(json.dumps(body))
        return out

    def _check_version(self, m: re.Match[str], body: dict[str, Any]) -> dict[str, Any]:
        if not _VERSION_NAME.match(m["version"]) or any(int(x) > 2**31 - 1 for x in m["version"].split(".")):
            raise ArmError(400, "InvalidParameter",
                           f"The gallery image version name '{m['version']}' is invalid. It must follow the "
                           "format Major(int32).Minor(int32).Patch(int32).")
        storage = _need(body, "properties.storageProfile")
        source = storage.get("osDiskImage", {}).get("source") or storage.get("source")
        if not isinstance(source, dict) or not (source.get("uri") or source.get("id")):
            raise ArmError(400, "InvalidParameter", "Required parameter 'storageProfile.osDiskImage.source' "
                                                    "(uri or id) is missing (null).")
        if source.get("uri"):
            if not str(source["uri"]).lower().endswith(".vhd"):
                raise ArmError(400, "InvalidParameter", f"The source blob '{source['uri']}' is not a .vhd blob.")
            account_id = _need(source, "storageAccountId")
            if not re.match(r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Storage/"
                            r"storageAccounts/[a-z0-9]{3,24}$", account_id, re.I):
                raise ArmError(400, "InvalidParameter", f"The storage account id '{account_id}' is invalid.")
        profile = body["properties"].get("publishingProfile") or {}
        for i, r in enumerate(profile.get("targetRegions") or []):
            _need(r, "name")
            n = r.get("regionalReplicaCount", 1)
            if not isinstance(n, int) or not 1 <= n <= 100:
                raise ArmError(400, "InvalidParameter", f"targetRegions[{i}].regionalReplicaCount {n!r} is not "
                                                        "between 1 and 100.")
        if "endOfLifeDate" in profile:
            try:
                eol = dt.datetime.fromisoformat(str(profile["endOfLifeDate"]).replace("Z", "+00:00"))
            except ValueError:
                raise ArmError(400, "InvalidParameter", "endOfLifeDate is not a valid date-time.") from None
            if eol <= dt.datetime.now(dt.UTC):
                raise ArmError(400, "InvalidParameter", "The end of life date must be set to a future date.")
        out: dict[str, Any] = json.loads(json.dumps(body))
        out["properties"].setdefault("publishingProfile", {})["publishedDate"] = _now()
        return out

    def _immutable(self, kind: str, old: dict[str, Any], new: dict[str, Any]) -> None:
        fields = {"image": ("osType", "osState", "hyperVGeneration", "identifier"),
                  "version": ("storageProfile",)}[kind]
        for f in fields:
            if old["properties"].get(f) != new["properties"].get(f):
                name = "galleryImage" if kind == "image" else "galleryImageVersion"
                raise ArmError(409, "PropertyChangeNotAllowed",
                               f"Changing property '{name}.properties.{f}' is not allowed.")

    def _operation(self, op_id: str) -> tuple[int, dict[str, str], Any]:
        op = self.state.operations.get(op_id)
        if op is None:
            raise ArmError(404, "NotFound", f"Operation {op_id} was not found.")
        res = self.state.resources[op.resource_key]
        if op.status == "InProgress":
            if op.polls_left > 0:
                op.polls_left -= 1
            else:
                op.status = "Failed" if op.fail else "Succeeded"
                res["properties"]["provisioningState"] = op.status
        body: dict[str, Any] = {"name": op_id, "status": op.status, "startTime": _now()}
        if op.status == "Failed" and op.fail:
            body["error"] = dict(op.fail)
        if op.status != "InProgress":
            body["endTime"] = _now()
        return 200, {"Retry-After": "0"} if op.status == "InProgress" else {}, body


def _handler(standin: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self, method: str) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body: Any = None
            status, answer = 500, None
            headers: dict[str, str] = {}
            try:
                if raw:
                    try:
                        body = json.loads(raw)
                    except json.JSONDecodeError:
                        raise ArmError(400, "InvalidRequestContent", "The request content was not valid JSON.") \
                            from None
                    if self.headers.get_content_type() != "application/json":
                        raise ArmError(415, "UnsupportedMediaType", "The content type must be application/json.")
                with standin.lock:
                    status, headers, answer = standin.handle(method, parts.path, query, self.headers, body)
            except ArmError as exc:
                status, answer = exc.status, {"error": {"code": exc.code, "message": exc.message}}
                headers = {"x-ms-failure-cause": "gateway"}
                if exc.status == 401:
                    headers["WWW-Authenticate"] = ('Bearer authorization_uri="https://login.example/", '
                                                   'error="invalid_token"')
            with standin.lock:
                standin.state.requests.append(Recorded(method, parts.path, query, body, status))
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-ms-request-id", str(uuid.uuid4()))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

    return Handler


def _self_signed(cert_path: Path, key_path: Path) -> None:
    """A self-signed certificate for 127.0.0.1 (cryptography comes with azure-identity)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "arm-standin")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
