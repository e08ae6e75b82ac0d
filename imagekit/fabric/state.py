"""What one VM's fabric has seen: every request, the health reports, and a wait on the provisioning outcome.

All of it lives in one :class:`FabricState` per :class:`~imagekit.fabric.Fabric` (nothing module- or
class-level), guarded by one lock, with a condition the harness waits on instead of sleeping.
Bodies are never logged; the parsed health reports and the telemetry/status bodies are kept in memory
(bounded) for the harness to read.
"""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from imagekit.errors import ProvisioningError

MAX_RECORDS = 10_000
MAX_BODIES = 200


class Service(StrEnum):
    """The three endpoints a VM reaches."""

    WIRE = "wire"  # WireServer, 168.63.129.16:80
    HOSTGA = "hostga"  # HostGAPlugin, 168.63.129.16:32526
    IMDS = "imds"  # Instance Metadata Service, 169.254.169.254:80


@dataclass(frozen=True)
class RequestRecord:
    """One request as served: never its body or headers (they may carry secrets)."""

    service: Service
    method: str
    path: str  # path and query, truncated to 512 characters
    status: int
    at: float  # time.monotonic() when answered


@dataclass(frozen=True)
class ReportedState:
    """One health report the agent posted: ``state`` is "Ready" or "NotReady"."""

    state: str
    substatus: str | None
    description: str | None
    at: float

    @property
    def failed(self) -> bool:
        # Both agents report a provisioning failure as NotReady/ProvisioningFailed (waagent
        # pa/provision/default.py report_not_ready; cloud-init GoalStateHealthReporter.send_failure_signal).
        return self.state == "NotReady" and self.substatus == "ProvisioningFailed"

    def __str__(self) -> str:
        if self.substatus is None:
            return self.state
        return f"{self.state} ({self.substatus}: {self.description or ''})"


class HealthReportError(ValueError):
    """A health report body that is not a well-formed report for this VM."""


def _text(node: ET.Element | None, path: str) -> str | None:
    if node is None:
        return None
    found = node.find(path)
    return found.text.strip() if found is not None and found.text is not None else None


def parse_health_report(body: bytes, container_id: str, instance_id: str) -> ReportedState:
    """Parse ``POST /machine?comp=health`` (WALinuxAgent ``wire.py _build_health_report``).

    Refuses DTDs outright (no entity expansion of any kind), reports for another container or role
    instance, and states other than Ready/NotReady.
    """
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise HealthReportError("DTDs and entities are not accepted")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise HealthReportError(f"not well-formed XML: {exc}") from None
    if root.tag != "Health":
        raise HealthReportError(f"root element is {root.tag!r}, expected 'Health'")
    container = root.find("Container")
    got_container = _text(container, "ContainerId")
    if got_container != container_id:
        raise HealthReportError(f"ContainerId {got_container!r} is not this VM's")
    role = container.find("RoleInstanceList/Role") if container is not None else None
    got_instance = _text(role, "InstanceId")
    if got_instance != instance_id:
        raise HealthReportError(f"InstanceId {got_instance!r} is not this VM's")
    health = role.find("Health") if role is not None else None
    state = _text(health, "State")
    if state not in ("Ready", "NotReady"):
        raise HealthReportError(f"State {state!r} is not Ready or NotReady")
    details = health.find("Details") if health is not None else None
    return ReportedState(
        state=state,
        substatus=_text(details, "SubStatus"),
        description=_text(details, "Description"),
        at=time.monotonic(),
    )


class ReadyTimeout(ProvisioningError):
    """No Ready (and no failure) was reported before the deadline."""


class AgentReportedFailure(ProvisioningError):
    """The guest agent reported that provisioning failed; the message carries its own description."""

    def __init__(self, report: ReportedState) -> None:
        self.report = report
        super().__init__(f"the guest agent reported a provisioning failure: {report.description or '(no description)'}")


# What a provisioning run is expected to show, in order, so a timeout can say how far it got.
_MILESTONES: tuple[tuple[str, Service, str], ...] = (
    ("IMDS metadata (cloud-init)", Service.IMDS, "/metadata/instance"),
    ("WireServer versions (waagent)", Service.WIRE, "/?comp=versions"),
    ("goal state", Service.WIRE, "/machine/?comp=goalstate"),
    ("health report", Service.WIRE, "/machine?comp=health"),
)


class FabricState:
    """Thread-safe record of one VM's traffic and reported provisioning state."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requests: deque[RequestRecord] = deque(maxlen=MAX_RECORDS)
        self._reports: deque[ReportedState] = deque(maxlen=MAX_RECORDS)
        self._telemetry: deque[bytes] = deque(maxlen=MAX_BODIES)
        self._status: deque[bytes] = deque(maxlen=MAX_BODIES)
        self._request_count = 0

    def record_request(self, rec: RequestRecord) -> None:
        with self._cond:
            self._requests.append(rec)
            self._request_count += 1
            self._cond.notify_all()

    def record_report(self, report: ReportedState) -> None:
        with self._cond:
            self._reports.append(report)
            self._cond.notify_all()

    def record_telemetry(self, body: bytes) -> None:
        with self._cond:
            self._telemetry.append(body)

    def record_status(self, body: bytes) -> None:
        with self._cond:
            self._status.append(body)

    def requests(self) -> list[RequestRecord]:
        with self._cond:
            return list(self._requests)

    def reports(self) -> list[ReportedState]:
        with self._cond:
            return list(self._reports)

    def telemetry(self) -> list[bytes]:
        with self._cond:
            return list(self._telemetry)

    def status_uploads(self) -> list[bytes]:
        with self._cond:
            return list(self._status)

    @property
    def last_report(self) -> ReportedState | None:
        with self._cond:
            return self._reports[-1] if self._reports else None

    def _outcome(self) -> ReportedState | None:
        for rep in self._reports:
            if rep.state == "Ready" or rep.failed:
                return rep
        return None

    def wait_for_ready(self, timeout: float) -> ReportedState:
        """Block until the agent reports Ready (returned) or a failure (raises
        :class:`AgentReportedFailure`), or raise :class:`ReadyTimeout` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                outcome = self._outcome()
                if outcome is not None:
                    if outcome.failed:
                        raise AgentReportedFailure(outcome)
                    return outcome
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ReadyTimeout(self._timeout_message(timeout))
                self._cond.wait(remaining)

    def wait_for_request(self, service: Service, path_prefix: str, timeout: float) -> RequestRecord:
        """Block until a request to ``service`` whose path starts with ``path_prefix`` was answered."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for rec in self._requests:
                    if rec.service is service and rec.path.startswith(path_prefix):
                        return rec
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ReadyTimeout(
                        f"no {service.value} request for {path_prefix} within {timeout:g} s; " + self._summary()
                    )
                self._cond.wait(remaining)

    def _summary(self) -> str:
        seen = [name for name, svc, prefix in _MILESTONES if self._seen(svc, prefix)]
        missing = [name for name, svc, prefix in _MILESTONES if not self._seen(svc, prefix)]
        last = self._reports[-1] if self._reports else None
        return (
            f"{self._request_count} request(s) received; "
            f"seen: {', '.join(seen) or 'nothing'}; "
            f"not seen: {', '.join(missing) or 'nothing'}; "
            f"last reported state: {last if last is not None else 'none'}"
        )

    def _timeout_message(self, timeout: float) -> str:
        return f"the guest agent did not report Ready within {timeout:g} s: " + self._summary()

    def _seen(self, service: Service, prefix: str) -> bool:
        return any(r.service is service and r.path.startswith(prefix) for r in self._requests)
