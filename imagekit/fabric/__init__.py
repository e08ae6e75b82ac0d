"""An emulation of Azure's per-VM platform endpoints: WireServer, HostGAPlugin, IMDS and DNS.

Azure itself cannot run here, so this is a stand-in (a mock of Azure, named as such), checked against
the agents' own client code (waagent and cloud-init from the Debian packages) in
``tests/test_fabric_agents.py``. One :class:`Fabric` serves one VM on private Unix sockets; the VM
runner's relay forwards the guest's connections to 168.63.129.16:80/32526 and 169.254.169.254:80 there.

Not emulated (no agent here needs it to provision): Fast Track (``vmSettings`` answers 404, "not
supported"), certificates (see :mod:`imagekit.fabric.documents`), extensions and agent auto-update (no
GA families), goal-state changes (the incarnation stays 1), the Metadata Security Protocol's secure
channel, IMDS ``attested``/``identity``/``scheduledevents``/``reprovisiondata`` (404) and IMDS rate
limiting, and an upstream DNS resolver (by design: the VM reaches nothing else).
"""

from imagekit.fabric.dns import AZURE_DNS_SUFFIX, dns_answer, dns_names
from imagekit.fabric.documents import HOSTGA_PORT, IMDS_IP, WIRESERVER_IP
from imagekit.fabric.fabric import Fabric, SocketPaths
from imagekit.fabric.http import Limits
from imagekit.fabric.identity import VMIdentity
from imagekit.fabric.state import (
    AgentReportedFailure,
    ReadyTimeout,
    ReportedState,
    RequestRecord,
    Service,
)

__all__ = [
    "AZURE_DNS_SUFFIX",
    "HOSTGA_PORT",
    "IMDS_IP",
    "WIRESERVER_IP",
    "AgentReportedFailure",
    "Fabric",
    "Limits",
    "ReadyTimeout",
    "ReportedState",
    "RequestRecord",
    "Service",
    "SocketPaths",
    "VMIdentity",
    "dns_answer",
    "dns_names",
]
