"""Routing for the three services: pure functions of a request, the VM's identity and its state.

Each app answers what the agents ask (see :mod:`imagekit.fabric.documents` for the documents) and
refuses everything else the way the real service does: unknown paths 404, a wrong method 405, and for
IMDS a missing ``Metadata: true`` header or an unknown ``api-version`` 400 with Azure's JSON error body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from imagekit.config.profile import ProvisioningProfile
from imagekit.fabric import documents as docs
from imagekit.fabric.http import Request, Response, escape
from imagekit.fabric.identity import VMIdentity
from imagekit.fabric.state import FabricState, HealthReportError, parse_health_report

log = logging.getLogger(__name__)

XML = "text/xml; charset=utf-8"
JSON = "application/json; charset=utf-8"

IMDS_HEADER_ERROR = "Bad request. Required metadata header not specified"
# Azure's IMDS documentation ("Security and authentication"): a request must not carry X-Forwarded-For,
# and one that does "will be rejected by the service". It gives no status or body for that case; 400 is
# the status its error table gives for a request that breaks the header rules, the wording is ours.
IMDS_FORWARDED_ERROR = "Bad request. Requests with an X-Forwarded-For header are not accepted"
IMDS_MAX_INDEX_DIGITS = 6
IMDS_VERSION_ERROR = (
    "Bad request. api-version is invalid or was not specified in the request. "
    "For more information refer to aka.ms/azureimds"
)


def _text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


class FabricApps:
    """The WireServer, HostGAPlugin and IMDS apps of one VM."""

    def __init__(
        self,
        identity: VMIdentity,
        profile: ProvisioningProfile,
        state: FabricState,
        imds_api_versions: Sequence[str] = docs.IMDS_API_VERSIONS,
        name: str = "",
    ) -> None:
        self.name = name or profile.hostname
        self.identity = identity
        self.profile = profile
        self.state = state
        self.imds_api_versions = tuple(imds_api_versions)
        # Rendered once: the goal state never changes during a VM's life here (incarnation 1).
        self._goal_state = docs.goal_state_xml(identity, profile).encode()
        self._configs = {
            "hostingEnvironmentConfig": docs.hosting_env_xml(identity, profile).encode(),
            "sharedConfig": docs.shared_config_xml(identity, profile).encode(),
            "extensionsConfig": docs.extensions_config_xml(identity, profile).encode(),
        }
        self._instance_id = identity.role_instance_id(profile.hostname)

    # --- WireServer (168.63.129.16:80) ---

    def wire(self, req: Request) -> Response:
        comp = req.arg("comp")
        path = req.path
        if path == "/" and comp == "versions":
            return self._only(req, "GET") or Response(200, docs.versions_xml().encode(), XML)
        if path in ("/machine", "/machine/"):
            if comp == "goalstate":
                return self._only(req, "GET") or Response(200, self._goal_state, XML)
            if comp == "health":
                return self._only(req, "POST") or self._health(req)
            if comp == "telemetrydata":
                if bad := self._only(req, "POST"):
                    return bad
                self.state.record_telemetry(req.body)
                return Response(200)
            if comp == "roleProperties":
                return self._only(req, "POST") or Response(200)
            return _text(404, "Not Found")
        prefix = f"/machine/{self.identity.container_id}/"
        if path.startswith(prefix) and comp == "config":
            body = self._configs.get(req.arg("type") or "")
            if body is None or req.arg("incarnation") not in (None, docs.INCARNATION):
                return _text(404, "Not Found")
            return self._only(req, "GET") or Response(200, body, XML)
        if path == "/HealthService":
            return self._only(req, "POST") or Response(200)
        return _text(404, "Not Found")

    def _health(self, req: Request) -> Response:
        try:
            report = parse_health_report(req.body, self.identity.container_id, self._instance_id)
        except HealthReportError as exc:
            log.warning("%s: refused a health report: %s", self.name, escape(str(exc), 512))
            return _text(400, f"Bad request: invalid health report: {escape(str(exc), 512)}")
        # The state and the agent's own description: what the harness waits for and what a failure says.
        # str(report) escapes the guest's text and bounds it.
        log.info("%s: the guest agent reported %s", self.name, report)
        self.state.record_report(report)
        return Response(200)

    # --- HostGAPlugin (168.63.129.16:32526) ---

    def hostga(self, req: Request) -> Response:
        path = req.path
        if path == "/vmSettings":
            # 404 = "this host does not support Fast Track"; waagent then uses the WireServer goal state.
            return self._only(req, "GET") or _text(404, "Not Found")
        if path == "/versions":
            body = json.dumps([docs.HOSTGA_API_VERSION]).encode()
            return self._only(req, "GET") or Response(200, body, JSON)
        if path == "/health":
            return self._only(req, "GET") or Response(200)
        if path == "/status":
            if bad := self._only(req, "PUT"):
                return bad
            try:
                doc = json.loads(req.body)
            except ValueError:
                return _text(400, "Bad request: status is not JSON")
            except RecursionError:
                return _text(400, "Bad request: status JSON is nested too deeply")
            if not isinstance(doc, dict) or "content" not in doc:
                return _text(400, "Bad request: status has no content")
            self.state.record_status(req.body)
            return Response(200)
        if path == "/vmAgentLog":
            return self._only(req, "PUT") or Response(200)
        return _text(404, "Not Found")

    # --- IMDS (169.254.169.254:80) ---

    def imds(self, req: Request) -> Response:
        path = req.path.rstrip("/") or "/"
        if not path.startswith("/metadata"):
            return self._imds_error(404, "Not found")
        if req.header("X-Forwarded-For") is not None:
            return self._imds_error(400, IMDS_FORWARDED_ERROR)
        if (req.header("Metadata") or "").strip().lower() != "true":
            return self._imds_error(400, IMDS_HEADER_ERROR)
        if self._only(req, "GET"):
            return self._imds_error(405, "Method not allowed")
        if path == "/metadata/versions":
            return self._json({"apiVersions": list(self.imds_api_versions)})
        version = req.arg("api-version")
        if version not in self.imds_api_versions:
            newest = sorted(self.imds_api_versions, reverse=True)[:3]
            return self._imds_error(400, IMDS_VERSION_ERROR, **{"newest-versions": newest})
        if path != "/metadata/instance" and not path.startswith("/metadata/instance/"):
            return self._imds_error(404, "Not found")
        extended = (req.arg("extended") or "").lower() == "true" and version >= docs.IMDS_EXTENDED_MIN
        node: Any = docs.imds_instance(self.identity, self.profile, extended=extended)
        for part in path.split("/")[3:]:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif (
                isinstance(node, list)
                and part.isascii()
                and part.isdigit()
                and len(part) <= IMDS_MAX_INDEX_DIGITS
                and int(part) < len(node)
            ):
                node = node[int(part)]
            else:
                return self._imds_error(404, "Not found")
        fmt = req.arg("format") or "json"
        if fmt == "text":
            if isinstance(node, dict | list):
                return self._imds_error(400, "Bad request. Text format is only supported for leaf nodes")
            return Response(200, str(node).encode(), "text/plain; charset=utf-8")
        if fmt != "json":
            return self._imds_error(400, "Bad request. Invalid format query parameter")
        return self._json(node)

    @staticmethod
    def _json(doc: Any) -> Response:
        return Response(200, json.dumps(doc).encode(), JSON)

    @staticmethod
    def _imds_error(status: int, message: str, **extra: Any) -> Response:
        return Response(status, docs.imds_error(message, **extra), JSON)

    @staticmethod
    def _only(req: Request, method: str) -> Response | None:
        if req.method == method:
            return None
        return Response(405, b"Method Not Allowed\n", headers=(("Allow", method),))
