"""One VM's fabric: its WireServer, HostGAPlugin and IMDS, served on private Unix sockets."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType

from imagekit.config.profile import ProvisioningProfile
from imagekit.core.errors import ImagekitError, InputError
from imagekit.fabric import documents as docs
from imagekit.fabric.dns import dns_answer, dns_names
from imagekit.fabric.http import App, Limits, OnServed, RunningServer, serve_tcp, serve_unix
from imagekit.fabric.identity import VMIdentity
from imagekit.fabric.services import FabricApps
from imagekit.fabric.state import FabricState, ReportedState, RequestRecord, Service

log = logging.getLogger(__name__)

SOCKET_NAMES = MappingProxyType({Service.WIRE: "wire.sock", Service.HOSTGA: "hostga.sock", Service.IMDS: "imds.sock"})
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL


@dataclass(frozen=True)
class SocketPaths:
    """Where each service listens. The relay maps 168.63.129.16:80 → ``wire``, 168.63.129.16:32526 →
    ``hostga`` and 169.254.169.254:80 → ``imds``."""

    wire: Path
    hostga: Path
    imds: Path

    def for_service(self, service: Service) -> Path:
        return {Service.WIRE: self.wire, Service.HOSTGA: self.hostga, Service.IMDS: self.imds}[service]


class Fabric:
    """The Azure platform endpoints for one VM, and what that VM's agent reported.

    Create one per VM; instances share nothing (each has its own state, servers and sockets)::

        fabric = Fabric(profile, VMIdentity(vm_uuid, mac="52:54:00:12:34:56", ip="10.0.0.4"))
        with fabric:
            paths = fabric.start(private_dir)       # a 0700 directory owned by us
            ...                                      # relay guest connections to paths.wire etc.
            ready = fabric.wait_for_ready(600)       # raises on failure or timeout
    """

    def __init__(
        self,
        profile: ProvisioningProfile,
        identity: VMIdentity,
        *,
        limits: Limits | None = None,
        imds_api_versions: Sequence[str] = docs.IMDS_API_VERSIONS,
        name: str | None = None,
    ) -> None:
        self.profile = profile
        self.identity = identity
        self.name = name or profile.hostname
        self.limits = limits or Limits()
        self.imds_api_versions = tuple(imds_api_versions)
        self.state = FabricState()
        self._apps = FabricApps(identity, profile, self.state, imds_api_versions, self.name)
        self._servers: list[RunningServer] = []
        self._lock = threading.Lock()
        self.sockets: SocketPaths | None = None

    # --- serving ---

    def app(self, service: Service) -> App:
        """The plain request → response function of one service (for in-process tests)."""
        return {Service.WIRE: self._apps.wire, Service.HOSTGA: self._apps.hostga, Service.IMDS: self._apps.imds}[
            service
        ]

    def _on_served(self, service: Service) -> OnServed:
        def record(method: str, target: str, status: int) -> None:
            self.state.record_request(RequestRecord(service, method, target, status, time.monotonic()))

        return record

    def start(self, sockdir: str | os.PathLike[str]) -> SocketPaths:
        """Serve the three services on Unix sockets in ``sockdir`` (a directory owned by this user with
        no group or other permissions) and return their paths. Background threads serve them until
        :meth:`stop`."""
        d = Path(sockdir)
        with self._lock:
            if self.sockets is not None:
                raise ImagekitError(f"fabric for {self.name} is already serving on {self.sockets.wire.parent}")
        try:
            st = d.lstat()
        except FileNotFoundError:
            raise InputError(f"fabric socket directory {d} does not exist") from None
        if not stat.S_ISDIR(st.st_mode):
            raise InputError(f"fabric socket directory {d} is not a directory (symlinks are not followed)")
        if st.st_uid != os.geteuid():
            raise InputError(f"fabric socket directory {d} is owned by uid {st.st_uid}, not by us")
        if st.st_mode & 0o077:
            raise InputError(
                f"fabric socket directory {d} has mode {stat.S_IMODE(st.st_mode):o}",
                hint="it must be private to this user (0700), so no other user can reach the VM's fabric",
            )
        paths = SocketPaths(**{svc.value: d / SOCKET_NAMES[svc] for svc in Service})
        for svc in Service:
            p = paths.for_service(svc)
            if len(os.fsencode(p)) > _SUN_PATH_MAX:
                raise InputError(
                    f"socket path {p} is longer than {_SUN_PATH_MAX} bytes", hint="use a shorter directory"
                )
            if p.exists() or p.is_symlink():
                raise InputError(f"socket path {p} already exists", hint="give each VM a fresh private directory")
        with self._lock:
            if self.sockets is not None:
                raise ImagekitError(f"fabric for {self.name} is already serving on {self.sockets.wire.parent}")
            started: list[RunningServer] = []
            try:
                for svc in Service:
                    started.append(
                        serve_unix(
                            str(paths.for_service(svc)),
                            self.app(svc),
                            self._on_served(svc),
                            self.limits,
                            self.name,
                            svc.value,
                        )
                    )
            except BaseException:
                for srv in started:
                    srv.close()
                raise
            self._servers.extend(started)
            self.sockets = paths
        log.debug("%s: fabric serving on %s", self.name, d)
        return paths

    def serve_tcp(self, host: str, port: int, service: Service) -> tuple[str, int]:
        """Also serve ``service`` on TCP ``host:port`` (port 0 picks one); returns the bound address.
        Meant for tests and for namespaces where a relay is not wanted."""
        srv = serve_tcp(
            host,
            port,
            self.app(service),
            self._on_served(service),
            self.limits,
            self.name,
            service.value,
        )
        with self._lock:
            self._servers.append(srv)
        addr = srv.address
        return str(addr[0]), int(addr[1])

    def stop(self) -> None:
        """Stop every server of this fabric and remove its socket files (idempotent)."""
        with self._lock:
            servers, self._servers = self._servers, []
            self.sockets = None
        errors: list[BaseException] = []

        def close(srv: RunningServer) -> None:
            try:
                srv.close()
            except Exception as exc:  # keep closing the others
                errors.append(exc)

        # In parallel: each server notices the shutdown request only at its next poll.
        closers = [threading.Thread(target=close, args=(srv,), name="fabric-stop") for srv in servers]
        for t in closers:
            t.start()
        for t in closers:
            t.join()
        if errors:
            raise ImagekitError(f"stopping the fabric for {self.name} failed: {errors[0]}") from errors[0]

    def __enter__(self) -> Fabric:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- what the agent did ---

    def wait_for_ready(self, timeout: float) -> ReportedState:
        """Wait for the agent's Ready report and return it. Raises
        :class:`~imagekit.fabric.state.AgentReportedFailure` with the agent's own description when it
        reports a provisioning failure, :class:`~imagekit.fabric.state.ReadyTimeout` (saying what was and
        was not received) after ``timeout`` seconds. Both are :class:`~imagekit.core.errors.ProvisioningError`."""
        return self.state.wait_for_ready(timeout)

    def wait_for_request(self, service: Service, path_prefix: str, timeout: float) -> RequestRecord:
        """Wait until a request to ``service`` whose path (with query) starts with ``path_prefix`` has
        been answered, e.g. ``(Service.IMDS, "/metadata/instance")``; :class:`ReadyTimeout` otherwise."""
        return self.state.wait_for_request(service, path_prefix, timeout)

    def requests(self) -> list[RequestRecord]:
        """Every request answered so far, in order (service, method, path with query, status)."""
        return self.state.requests()

    def reports(self) -> list[ReportedState]:
        """Every accepted health report, in order."""
        return self.state.reports()

    @property
    def last_report(self) -> ReportedState | None:
        return self.state.last_report

    # --- DNS ---

    def dns_names(self) -> dict[str, str]:
        return dns_names(self.profile.hostname, self.identity.ip)

    def dns_answer(self, query: bytes) -> bytes | None:
        return dns_answer(query, self.dns_names())
