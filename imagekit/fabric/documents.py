"""The documents the fabric serves, as pure functions of the VM's identity and provisioning profile.

Shapes follow what the agents parse (WALinuxAgent ``common/protocol/goal_state.py``, ``wire.py``,
``hostplugin.py``, ``imds.py``; cloud-init ``sources/helpers/azure.py`` and ``DataSourceAzure.py``) and
WALinuxAgent's own fixtures of real platform responses (``tests/data/wire/*.xml``, ``imds/valid.json``).

Certificates: the goal state carries **no** ``Certificates`` URL. Both agents here get the user's SSH
keys without it — waagent from the OVF ``PublicKey/Value`` (``osutil deploy_ssh_pubkey`` uses the value
directly when present) and cloud-init from IMDS ``compute.publicKeys`` — and the certificates document
only exists to deliver keys given by *fingerprint*, which the profile never does. Without the URL
waagent keeps an empty certificate list (``goal_state.py``) and cloud-init skips the request
(``GoalState(need_certificate=...)`` fetches only a URL that is present).
"""

from __future__ import annotations

import json
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from imagekit.config.profile import ProvisioningProfile
from imagekit.fabric.identity import VMIdentity

WIRESERVER_IP = "168.63.129.16"
IMDS_IP = "169.254.169.254"
HOSTGA_PORT = 32526
WIRE_PROTOCOL_VERSION = "2012-11-30"
HOSTGA_API_VERSION = "2015-09-01"
INCARNATION = "1"

# IMDS api-versions that Azure accepts (the "newest-versions" Azure lists come first in its 400 body).
IMDS_API_VERSIONS: tuple[str, ...] = (
    "2017-03-01", "2017-04-02", "2017-08-01", "2017-10-01", "2017-12-01", "2018-02-01", "2018-04-02",
    "2018-10-01", "2019-02-01", "2019-03-11", "2019-04-30", "2019-06-01", "2019-06-04", "2019-08-01",
    "2019-08-15", "2019-11-01", "2020-06-01", "2020-07-15", "2020-09-01", "2020-10-01", "2020-12-01",
    "2021-01-01", "2021-02-01", "2021-03-01", "2021-05-01", "2021-08-01", "2021-10-01", "2021-11-01",
    "2021-11-15", "2021-12-13", "2022-02-01", "2022-03-01", "2022-07-01", "2022-08-01", "2022-11-01",
    "2023-07-01",
)  # fmt: skip
IMDS_EXTENDED_MIN = "2021-03-01"


def _config_url(identity: VMIdentity, hostname: str, query: str) -> str:
    # Real goal states point at the WireServer's own address with a per-VM path; the path carries the
    # container id so that a request for another VM's config can be refused.
    instance = identity.role_instance_id(hostname).replace("-", "%2D").replace("_", "%5F")
    return f"http://{WIRESERVER_IP}:80/machine/{identity.container_id}/{instance}?{query}"


def versions_xml() -> str:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<Versions>\n'
        f"  <Preferred>\n    <Version>{WIRE_PROTOCOL_VERSION}</Version>\n  </Preferred>\n"
        f"  <Supported>\n    <Version>{WIRE_PROTOCOL_VERSION}</Version>\n"
        "    <Version>2010-12-15</Version>\n    <Version>2010-28-10</Version>\n  </Supported>\n"
        "</Versions>\n"
    )


def goal_state_xml(identity: VMIdentity, profile: ProvisioningProfile) -> str:
    h = profile.hostname
    inc = INCARNATION

    def url(q: str) -> str:
        return escape(_config_url(identity, h, q))

    return f"""<?xml version="1.0" encoding="utf-8"?>
<GoalState xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:noNamespaceSchemaLocation="goalstate10.xsd">
  <Version>2010-12-15</Version>
  <Incarnation>{inc}</Incarnation>
  <Machine>
    <ExpectedState>Started</ExpectedState>
    <StopRolesDeadlineHint>300000</StopRolesDeadlineHint>
    <LBProbePorts>
      <Port>16001</Port>
    </LBProbePorts>
    <ExpectHealthReport>FALSE</ExpectHealthReport>
  </Machine>
  <Container>
    <ContainerId>{escape(identity.container_id)}</ContainerId>
    <RoleInstanceList>
      <RoleInstance>
        <InstanceId>{escape(identity.role_instance_id(h))}</InstanceId>
        <State>Started</State>
        <Configuration>
          <HostingEnvironmentConfig>{url(f"comp=config&type=hostingEnvironmentConfig&incarnation={inc}")}</HostingEnvironmentConfig>
          <SharedConfig>{url(f"comp=config&type=sharedConfig&incarnation={inc}")}</SharedConfig>
          <ExtensionsConfig>{url(f"comp=config&type=extensionsConfig&incarnation={inc}")}</ExtensionsConfig>
          <ConfigName>{escape(identity.role_config_name(h))}</ConfigName>
        </Configuration>
      </RoleInstance>
    </RoleInstanceList>
  </Container>
</GoalState>
"""


def _deployment(identity: VMIdentity) -> str:
    dep = identity.container_id.replace("-", "")
    return (
        f"  <Deployment name={quoteattr(dep)} guid={quoteattr('{' + identity.container_id + '}')} "
        'incarnation="0">\n'
        '    <Service name="imagekit" guid="{00000000-0000-0000-0000-000000000000}" />\n'
        f"    <ServiceInstance name={quoteattr(dep + '.0')} guid={quoteattr('{' + identity.vm_id + '}')} />\n"
        "  </Deployment>\n"
    )


def hosting_env_xml(identity: VMIdentity, profile: ProvisioningProfile) -> str:
    # waagent reads Incarnation@instance (vm name), Role@name and Deployment@name from this document.
    role = "_" + profile.hostname
    return (
        f'<HostingEnvironmentConfig version="1.0.0.0" goalStateIncarnation="{INCARNATION}">\n'
        "  <StoredCertificates />\n"
        + _deployment(identity)
        + f'  <Incarnation number="1" instance={quoteattr(role)} guid={quoteattr("{" + identity.vm_id + "}")} />\n'
        f"  <Role guid={quoteattr('{' + identity.vm_id + '}')} name={quoteattr(role)} "
        'hostingEnvironmentVersion="1" software="" softwareType="ApplicationPackage" entryPoint="" '
        'parameters="" settleTimeSeconds="10" />\n'
        '  <HostingEnvironmentSettings name="full">\n    <CAS mode="full" />\n'
        '    <PrivilegeLevel mode="max" />\n  </HostingEnvironmentSettings>\n'
        "  <ApplicationSettings />\n  <ResourceReferences />\n"
        "</HostingEnvironmentConfig>\n"
    )


def shared_config_xml(identity: VMIdentity, profile: ProvisioningProfile) -> str:
    role = "_" + profile.hostname
    return (
        f'<SharedConfig version="1.0.0.0" goalStateIncarnation="{INCARNATION}">\n'
        + _deployment(identity)
        + f'  <Incarnation number="1" instance={quoteattr(role)} guid={quoteattr("{" + identity.vm_id + "}")} />\n'
        f'  <Role guid={quoteattr("{" + identity.vm_id + "}")} name={quoteattr(role)} settleTimeSeconds="0" />\n'
        '  <LoadBalancerSettings timeoutSeconds="0" waitLoadBalancerProbeCount="8">\n'
        "    <Probes />\n  </LoadBalancerSettings>\n  <OutputEndpoints />\n"
        f"  <Instances>\n    <Instance id={quoteattr(role)} address={quoteattr(identity.ip)}>\n"
        '      <FaultDomains randomId="0" updateId="0" updateCount="0" />\n'
        "      <InputEndpoints />\n    </Instance>\n  </Instances>\n"
        "</SharedConfig>\n"
    )


def status_blob_url(identity: VMIdentity, profile: ProvisioningProfile) -> str:
    """Where the goal state tells waagent to upload its status.

    On Azure this is a SAS URL to blob storage. Here it names a storage host that does not resolve in
    the VM's network (the fabric's DNS answers NXDOMAIN), so waagent falls back to the HostGAPlugin's
    ``PUT /status``, as it does on Azure when storage is unreachable; no SAS token exists to leak.
    """
    return f"https://imagekit-fabric.blob.core.windows.net/$system/{profile.hostname}.{identity.vm_id}.status"


def extensions_config_xml(identity: VMIdentity, profile: ProvisioningProfile) -> str:
    # No GA families and no plugins: the agent has nothing to download or run. createdOnTicks is .NET
    # ticks (100 ns since 0001-01-01); a fixed value is enough since the goal state never changes.
    return (
        f'<Extensions version="1.0.0.0" goalStateIncarnation="{INCARNATION}">\n'
        '  <GuestAgentExtension xmlns:i="http://www.w3.org/2001/XMLSchema-instance">\n'
        "    <GAFamilies>\n    </GAFamilies>\n  </GuestAgentExtension>\n"
        "  <Plugins>\n  </Plugins>\n  <PluginSettings>\n  </PluginSettings>\n"
        f'  <StatusUploadBlob statusBlobType="BlockBlob">{escape(status_blob_url(identity, profile))}'
        "</StatusUploadBlob>\n"
        '  <InVMGoalStateMetaData inSvdSeqNo="1" createdOnTicks="638000000000000000" '
        f"activityId={quoteattr(identity.container_id)} correlationId={quoteattr(identity.vm_id)} />\n"
        "</Extensions>\n"
    )


def imds_instance(identity: VMIdentity, profile: ProvisioningProfile, *, extended: bool) -> dict[str, Any]:
    """IMDS ``/metadata/instance``. The same fields are served for every accepted api-version (Azure
    adds fields over versions; the agents here read only fields that exist in the versions they ask)."""
    sub = "00000000-0000-0000-0000-000000000000"
    user = profile.username
    compute: dict[str, Any] = {
        "azEnvironment": "AzurePublicCloud",
        "customData": "",
        "evictionPolicy": "",
        "isHostCompatibilityLayerVm": "false",
        "licenseType": "",
        "location": identity.location,
        "name": profile.hostname,
        "offer": "",
        "osProfile": {
            "adminUsername": user,
            "computerName": profile.hostname,
            "disablePasswordAuthentication": "true" if profile.disable_password_auth else "false",
        },
        "osType": "Linux",
        "placementGroupId": "",
        "plan": {"name": "", "product": "", "publisher": ""},
        "platformFaultDomain": "0",
        "platformUpdateDomain": "0",
        "priority": "",
        "provider": "Microsoft.Compute",
        "publicKeys": [
            {"keyData": key, "path": f"/home/{user}/.ssh/authorized_keys"} for key in profile.ssh_public_keys
        ],
        "publisher": "",
        "resourceGroupName": "imagekit",
        "resourceId": (
            f"/subscriptions/{sub}/resourceGroups/imagekit/providers/Microsoft.Compute/"
            f"virtualMachines/{profile.hostname}"
        ),
        "securityProfile": {"secureBootEnabled": "false", "virtualTpmEnabled": "false"},
        "sku": "",
        "subscriptionId": sub,
        "tags": "",
        "tagsList": [],
        "userData": "",
        "version": "",
        "vmId": identity.vm_id,
        "vmScaleSetName": "",
        "vmSize": identity.vm_size,
        "zone": "",
    }
    network = {
        "interface": [
            {
                "ipv4": {
                    "ipAddress": [{"privateIpAddress": identity.ip, "publicIpAddress": ""}],
                    "subnet": [{"address": str(identity.subnet.network_address), "prefix": str(identity.prefix_len)}],
                },
                "ipv6": {"ipAddress": []},
                "macAddress": identity.mac_imds,
            }
        ]
    }
    doc: dict[str, Any] = {"compute": compute, "network": network}
    if extended:
        doc["extended"] = {"compute": {"hasCustomData": profile.custom_data is not None, "ppsType": "None"}}
    return doc


def imds_error(message: str, **extra: Any) -> bytes:
    return json.dumps({"error": message, **extra}).encode()
