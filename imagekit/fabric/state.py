"""What one VM's fabric has seen: every request, the health reports, and a wait on the provisioning outcome.

All of it lives in one :class:`FabricState` per :class:`~imagekit.fabric.Fabric` (nothing module- or
class-level), guarded by one lock, with a condition the harness waits on instead of sleeping.
Bodies are never logged; the parsed health reports and the telemetry/status bodies are kept in memory
for the harness to read, within a budget per VM (a guest cannot grow the harness's memory): a description
is cut at ``MAX_DESCRIPTION`` characters with a marker, and each kind of record keeps at most a fixed
number of entries and bytes, dropping the oldest first. The provisioning outcome (the first Ready or
failure report) is kept whatever is dropped.
"""

from __future__ import annotations

import itertools
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

import defusedxml
import defusedxml.ElementTree as SafeET

from imagekit.core.errors import ProvisioningError
from imagekit.fabric.http import escape

MAX_RECORDS = 10_000  # request records (each without body or headers, its path cut to 512 characters)
MAX_FIRST_PATHS = 4_096  # distinct (service, path) pairs whose first request is kept beyond MAX_RECORDS
MAX_REPORTS = 1_000
MAX_DESCRIPTION = 4_096  # characters of one report's description that are kept
REPORT_BUDGET = 1024 * 1024  # characters of descriptions kept per VM, all reports together
MAX_BODIES = 200
BODY_BUDGET = 4 * 1024 * 1024  # bytes kept per VM of telemetry bodies, and again of status uploads

T = TypeVar("T")


class _Bounded(Generic[T]):
    """A FIFO that keeps at most ``max_items`` items and ``budget`` units of size, dropping the oldest."""

    def __init__(self, max_items: int, budget: int) -> None:
        self.items: deque[tuple[T, int]] = deque()
        self.max_items = max_items
        self.budget = budget
        self.size = 0
        self.dropped = 0

    def append(self, item: T, size: int) -> None:
        self.items.append((item, size))
        self.size += size
        while len(self.items) > self.max_items or (self.size > self.budget and len(self.items) > 1):
            _, gone = self.items.popleft()
            self.size -= gone
            self.dropped += 1

    def values(self) -> list[T]:
        return [item for item, _ in self.items]


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with a marker saying how much was cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + f" …[truncated: {len(text) - limit} more characters]"


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
        # Escaped: this goes into log lines and error messages, and the substatus and description are
        # the guest's text.
        if self.substatus is None:
            return self.state
        return f"{self.state} ({escape(self.substatus, 64)}: {escape(self.description or '', 512)})"


class HealthReportError(ValueError):
    """A health report body that is not a well-formed report for this VM."""


def _text(node: ET.Element | None, path: str) -> str | None:
    if node is None:
        return None
    found = node.find(path)
    return found.text.strip() if found is not None and found.text is not None else None


def parse_health_report(body: bytes, container_id: str, instance_id: str) -> ReportedState:
    """Parse ``POST /machine?comp=health`` (WALinuxAgent ``wire.py _build_health_report``).

    Parsed by defusedxml, which refuses any DTD, entity declaration or external reference whatever the
    document's encoding; refuses encodings Python's XML parser cannot read, reports for another container
    or role instance, and states other than Ready/NotReady. The description is cut to ``MAX_DESCRIPTION``.
    """
    try:
        root = SafeET.fromstring(body, forbid_dtd=True)
    except defusedxml.DefusedXmlException:
        raise HealthReportError("DTDs, entities and external references are not accepted") from None
    except ET.ParseError as exc:
        raise HealthReportError(f"not well-formed XML: {exc}") from None
    except (LookupError, ValueError) as exc:  # an unknown or multi-byte encoding in the XML declaration
        raise HealthReportError(f"unsupported XML encoding: {escape(str(exc), 80)}") from None
    if root.tag != "Health":
        raise HealthReportError(f"root element is {escape(root.tag, 64)!r}, expected 'Health'")
    container = root.find("Container")
    got_container = _text(container, "ContainerId")
    if got_container != container_id:
        raise HealthReportError(f"ContainerId {_shown(got_container)} is not this VM's")
    role = container.find("RoleInstanceList/Role") if container is not None else None
    got_instance = _text(role, "InstanceId")
    if got_instance != instance_id:
        raise HealthReportError(f"InstanceId {_shown(got_instance)} is not this VM's")
    health = role.find("Health") if role is not None else None
    state = _text(health, "State")
    if state not in ("Ready", "NotReady"):
        raise HealthReportError(f"State {_shown(state)} is not Ready or NotReady")
    details = health.find("Details") if health is not None else None
    substatus = _text(details, "SubStatus")
    description = _text(details, "Description")
    return ReportedState(
        state=state,
        substatus=None if substatus is None else truncate(substatus, 256),
        description=None if description is None else truncate(description, MAX_DESCRIPTION),
        at=time.monotonic(),
    )


def _shown(value: str | None) -> str:
    return "None" if value is None else "'" + escape(value, 80) + "'"


class ReadyTimeout(ProvisioningError):
    """No Ready (and no failure) was reported before the deadline."""


class AgentReportedFailure(ProvisioningError):
    """The guest agent reported that provisioning failed; the message carries its own description."""

    def __init__(self, report: ReportedState) -> None:
        self.report = report
        described = escape(report.description, 1024) if report.description else "(no description)"
        super().__init__(f"the guest agent reported a provisioning failure: {described}")


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
        self._reports: _Bounded[ReportedState] = _Bounded(MAX_REPORTS, REPORT_BUDGET)
        self._outcome_report: ReportedState | None = None  # the first Ready or failure, kept whatever is dropped
        self._telemetry: _Bounded[bytes] = _Bounded(MAX_BODIES, BODY_BUDGET)
        self._status: _Bounded[bytes] = _Bounded(MAX_BODIES, BODY_BUDGET)
        self._request_count = 0
        # The first request of each distinct path, so a guest that floods past MAX_RECORDS cannot push its
        # own goal-state fetch out of what the harness waits on and reports.
        self._first: dict[tuple[Service, str], RequestRecord] = {}

    def record_request(self, rec: RequestRecord) -> None:
        with self._cond:
            self._requests.append(rec)
            self._request_count += 1
            key = (rec.service, rec.path)
            if key not in self._first and len(self._first) < MAX_FIRST_PATHS:
                self._first[key] = rec
            self._cond.notify_all()

    def record_report(self, report: ReportedState) -> None:
        size = len(report.description or "") + len(report.substatus or "")
        with self._cond:
            self._reports.append(report, size)
            if self._outcome_report is None and (report.state == "Ready" or report.failed):
                self._outcome_report = report
            self._cond.notify_all()

    def record_telemetry(self, body: bytes) -> None:
        with self._cond:
            self._telemetry.append(body[:BODY_BUDGET], min(len(body), BODY_BUDGET))

    def record_status(self, body: bytes) -> None:
        with self._cond:
            self._status.append(body[:BODY_BUDGET], min(len(body), BODY_BUDGET))

    def stored_bytes(self) -> int:
        """What this VM's guest has made the harness keep: description characters and body bytes."""
        with self._cond:
            return self._reports.size + self._telemetry.size + self._status.size

    def requests(self) -> list[RequestRecord]:
        with self._cond:
            return list(self._requests)

    def reports(self) -> list[ReportedState]:
        with self._cond:
            return self._reports.values()

    def telemetry(self) -> list[bytes]:
        with self._cond:
            return self._telemetry.values()

    def status_uploads(self) -> list[bytes]:
        with self._cond:
            return self._status.values()

    @property
    def last_report(self) -> ReportedState | None:
        with self._cond:
            return self._reports.items[-1][0] if self._reports.items else None

    def _outcome(self) -> ReportedState | None:
        return self._outcome_report

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
                    raise ReadyTimeout(self.ready_timeout_message(timeout))
                self._cond.wait(remaining)

    def wait_for_request(self, service: Service, path_prefix: str, timeout: float) -> RequestRecord:
        """Block until a request to ``service`` whose path starts with ``path_prefix`` was answered."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for rec in itertools.chain(self._first.values(), self._requests):
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
        last = self._reports.items[-1][0] if self._reports.items else None
        return (
            f"{self._request_count} request(s) received; "
            f"seen: {', '.join(seen) or 'nothing'}; "
            f"not seen: {', '.join(missing) or 'nothing'}; "
            f"last reported state: {last if last is not None else 'none'}"
        )

    def ready_timeout_message(self, timeout: float) -> str:
        """What a wait of ``timeout`` seconds for Ready ended with: what was and was not received."""
        return f"the guest agent did not report Ready within {timeout:g} s: " + self._summary()

    def _seen(self, service: Service, prefix: str) -> bool:
        return any(r.service is service and r.path.startswith(prefix)
                   for r in itertools.chain(self._first.values(), self._requests))
