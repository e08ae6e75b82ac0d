"""The agents' own client code, from the Debian packages, talking to the fabric emulator.

These are the real peers: waagent's wire protocol, goal-state, HostGAPlugin and IMDS clients
(``azurelinuxagent.common.protocol``) and cloud-init's Azure helpers (``cloudinit.sources.helpers.azure``
and its IMDS client), for bookworm (waagent 2.7.3, cloud-init 22.4) and trixie (waagent 2.12,
cloud-init 25.1). The agents talk to fixed addresses (168.63.129.16:80 and :32526, 169.254.169.254:80),
so each run happens in a private network and mount namespace (``unshare --net --mount``): this file,
run as a script, is the driver inside it — it puts those addresses on the namespace's loopback, serves a
:class:`~imagekit.fabric.Fabric` there over TCP, calls the agent code and prints one JSON document of
what the agents parsed and what the fabric recorded. Nothing touches the host's network, and the tmpfs
mounts over /run, /var/log and /var/lib keep the agents' side files out of the host.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
if str(REPO) not in sys.path:  # when run as the driver script
    sys.path.insert(0, str(REPO))

from imagekit.core.run import run, which  # noqa: E402

VM_UUID = uuid.UUID("0f5e2d2a-7c41-4b1e-9d43-1a2b3c4d5e6f")
MAC = "52:54:00:ab:cd:ef"
GUEST_IP = "10.0.0.4"
HOSTNAME = "ikvm-oracle"
USERNAME = "azureuser"
FAILURE_TEXT = "Provisioning failed: OVF rejected (imagekit oracle test)"


# --------------------------------------------------------------------------------------------------
# The driver (runs inside the namespace)
# --------------------------------------------------------------------------------------------------


def _setup_namespace() -> None:
    run(["ip", "link", "set", "lo", "up"])
    run(["ip", "addr", "add", "168.63.129.16/32", "dev", "lo"])
    run(["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"])
    for d in ("/run", "/var/log", "/var/lib"):
        run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "tmpfs", d])


def _make_fabric(**kwargs: Any) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from imagekit.config.profile import ProvisioningProfile
    from imagekit.fabric import Fabric, VMIdentity

    key = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    profile = ProvisioningProfile(hostname=HOSTNAME, username=USERNAME, ssh_public_keys=(key + " oracle",))
    identity = VMIdentity(VM_UUID, mac=MAC, ip=GUEST_IP)
    return Fabric(profile, identity, **kwargs)


def _serve(fabric: Any) -> None:
    from imagekit.fabric import Service

    fabric.serve_tcp("168.63.129.16", 80, Service.WIRE)
    fabric.serve_tcp("168.63.129.16", 32526, Service.HOSTGA)
    fabric.serve_tcp("169.254.169.254", 80, Service.IMDS)


def _fabric_view(fabric: Any) -> dict[str, Any]:
    from imagekit.core.errors import ProvisioningError

    outcome: dict[str, Any]
    try:
        rep = fabric.wait_for_ready(0)
        outcome = {"ready": str(rep)}
    except ProvisioningError as exc:
        outcome = {"error": type(exc).__name__, "message": exc.message}
    return {
        "identity": {
            "vm_id": fabric.identity.vm_id,
            "container_id": fabric.identity.container_id,
            "instance_id": fabric.identity.role_instance_id(HOSTNAME),
            "mac_imds": fabric.identity.mac_imds,
            "key": fabric.profile.ssh_public_keys[0],
        },
        "requests": [[r.service.value, r.method, r.path, r.status] for r in fabric.requests()],
        "reports": [[r.state, r.substatus, r.description] for r in fabric.reports()],
        "telemetry": [b.decode("utf-8", "replace") for b in fabric.state.telemetry()],
        "status_uploads": len(fabric.state.status_uploads()),
        "outcome": outcome,
    }


def _drive_waagent(work: Path) -> dict[str, Any]:
    import azurelinuxagent.common.conf as conf  # type: ignore[import-not-found]
    from azurelinuxagent.common.protocol.imds import get_imds_client  # type: ignore[import-not-found]
    from azurelinuxagent.common.protocol.restapi import ProvisionStatus, VMStatus  # type: ignore[import-not-found]
    from azurelinuxagent.common.protocol.wire import WireProtocol  # type: ignore[import-not-found]

    lib = work / "waagent"
    lib.mkdir()
    conf.__conf__.load(f"Lib.Dir={lib}\nOS.OpensslPath=/usr/bin/openssl\n")
    out: dict[str, Any] = {}

    with _make_fabric() as fabric:
        _serve(fabric)
        protocol = WireProtocol("168.63.129.16")
        protocol.detect()  # versions, transport cert, goal state + vmSettings + hosting env + shared + ext config
        client = protocol.client
        gs = client.get_goal_state()
        vminfo = protocol.get_vminfo()
        if hasattr(protocol, "get_extensions_goal_state"):  # 2.7
            ext = protocol.get_extensions_goal_state()
        else:  # 2.12
            ext = gs.extensions_goal_state
        # 2.7 keeps None and 2.12 an empty list when the goal state has no Certificates URL; neither
        # agent asks protocol.get_certs() on its provisioning path.
        certs = client.get_certs()
        out["goal_state"] = {
            "incarnation": gs.incarnation,
            "container_id": gs.container_id,
            "role_instance_id": gs.role_instance_id,
            "role_config_name": gs.role_config_name,
            "vm_name": vminfo.vmName,
            "role_name": vminfo.roleName,
            "tenant_name": vminfo.tenantName,
            "certs": 0 if certs is None else len(certs.cert_list.certificates),
            "status_upload_blob": ext.status_upload_blob,
            "status_upload_blob_type": ext.status_upload_blob_type,
            "extensions": len(ext.extensions),
        }
        # What ProvisionHandler.run does: NotReady while provisioning, Ready at the end.
        protocol.report_provision_status(
            ProvisionStatus(status="NotReady", subStatus="Provisioning", description="Starting")
        )
        protocol.report_provision_status(ProvisionStatus(status="Ready"))
        # The extension handler's traffic: HostGAPlugin versions/health and a status upload, telemetry.
        host = client.get_host_plugin()
        out["hostga"] = {"initialized": bool(host.ensure_initialized()), "health": bool(host.get_health())}
        client.status_blob.set_vm_status(VMStatus(status="Ready", message="Guest Agent is running"))
        client.upload_status_blob()
        client.send_encoded_event("69B669B9-4AF8-4C50-BDC4-6006FA76E975", b'<Event id="1"/>')
        # IMDS, as waagent's telemetry uses it.
        import inspect

        imds = get_imds_client("168.63.129.16") if inspect.signature(get_imds_client).parameters else get_imds_client()
        compute = imds.get_compute()
        out["imds"] = {
            "vmId": compute.vmId,
            "name": compute.name,
            "location": compute.location,
            "osType": compute.osType,
            "validate": list(imds.validate()),
        }
        out["fabric"] = _fabric_view(fabric)

    # A failure report as ProvisionHandler sends it when provisioning raises (report_not_ready).
    with _make_fabric() as fabric:
        _serve(fabric)
        protocol = WireProtocol("168.63.129.16")
        protocol.detect()
        protocol.report_provision_status(
            ProvisionStatus(status="NotReady", subStatus="ProvisioningFailed", description=FAILURE_TEXT)
        )
        out["failure"] = _fabric_view(fabric)
    return out


def _drive_cloudinit(work: Path) -> dict[str, Any]:
    import cloudinit.sources.DataSourceAzure as dsaz  # type: ignore[import-not-found]  # first: it resolves cloud-init's import cycle
    from cloudinit.sources.helpers import azure as helpers  # type: ignore[import-not-found]

    out: dict[str, Any] = {}
    modern = hasattr(helpers, "report_dmesg_to_kvp")  # cloud-init >= 23

    def fetch_imds() -> dict[str, Any]:
        if modern:
            from cloudinit.sources.azure import imds  # type: ignore[import-not-found]

            md: dict[str, Any] = imds.fetch_metadata_with_api_fallback(retry_deadline=time.monotonic() + 60)
            return md
        result: dict[str, Any] = dsaz.DataSourceAzure.get_imds_data_with_api_fallback(None, retries=0)
        return result

    with _make_fabric() as fabric:
        _serve(fabric)
        md = fetch_imds()
        if modern:
            netcfg = dsaz.generate_network_config_from_instance_network_metadata(
                md["network"], apply_network_config_for_secondary_ips=True
            )
        else:
            netcfg = dsaz.generate_network_config_from_instance_network_metadata(md["network"])
        out["imds"] = {
            "username": dsaz._username_from_imds(md),
            "hostname": dsaz._hostname_from_imds(md),
            "disable_password": dsaz._disable_password_from_imds(md),
            "keys": dsaz.DataSourceAzure._get_public_keys_from_imds(None, md),
            "vmId": md["compute"]["vmId"],
            "ppsType": md.get("extended", {}).get("compute", {}).get("ppsType"),
            "netcfg": netcfg,
        }
        # Report ready as DataSourceAzure._report_ready does (no ISO to eject here).
        if modern:
            keys = helpers.get_metadata_from_fabric(endpoint="168.63.129.16", distro=None, pubkey_info=None)
        else:
            keys = helpers.get_metadata_from_fabric(endpoint="168.63.129.16", pubkey_info=None)
        out["report_ready_keys"] = keys
        out["fabric"] = _fabric_view(fabric)

    # An IMDS that does not know 2021-08-01 (as older Azure regions did): cloud-init falls back.
    from imagekit.fabric.documents import IMDS_API_VERSIONS

    older = [v for v in IMDS_API_VERSIONS if v < "2021-01-01"]
    with _make_fabric(imds_api_versions=older) as fabric:
        _serve(fabric)
        md = fetch_imds()
        out["fallback"] = {"hostname": dsaz._hostname_from_imds(md), "fabric": _fabric_view(fabric)}

    # A provisioning failure, as cloud-init reports it.
    with _make_fabric() as fabric:
        _serve(fabric)
        if modern:
            from cloudinit.sources.azure import errors  # type: ignore[import-not-found]

            error = errors.ReportableError(reason=FAILURE_TEXT)
            helpers.report_failure_to_fabric(endpoint="168.63.129.16", error=error)
        else:
            helpers.report_failure_to_fabric(endpoint="168.63.129.16", description=FAILURE_TEXT)
        out["failure"] = _fabric_view(fabric)
    return out


def driver_main(agent: str, site: str, work: str) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    _setup_namespace()
    sys.path.insert(0, site)
    os.environ["HOME"] = work  # nothing of the agents' lands in the real home
    result = _drive_waagent(Path(work)) if agent == "waagent" else _drive_cloudinit(Path(work))
    sys.stdout.write(json.dumps(result) + "\n")


# --------------------------------------------------------------------------------------------------
# The tests (run on the host, start the driver in a fresh namespace)
# --------------------------------------------------------------------------------------------------

_RESULTS: dict[tuple[str, str], dict[str, Any]] = {}


@pytest.fixture(scope="module")
def namespaces() -> None:
    if os.geteuid() != 0 or which("unshare") is None or which("ip") is None:
        pytest.skip("needs root with unshare and ip to make a private network namespace")
    probe = run(["unshare", "--net", "--mount", "--", "true"], check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network/mount namespaces here: {probe.stderr.strip()}")


def _driven(agent: str, site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    key = (agent, str(site))
    if key not in _RESULTS:
        work = tmp_path_factory.mktemp(f"{agent}-driver")
        proc = run(
            ["unshare", "--net", "--mount", "--", sys.executable, str(HERE), agent, str(site), str(work)],
            env={"PYTHONPATH": str(REPO)},
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            pytest.fail(f"{agent} driver failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        _RESULTS[key] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _RESULTS[key]


@pytest.fixture
def waagent_run(namespaces: None, waagent_lib: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _driven("waagent", waagent_lib, tmp_path_factory)


@pytest.fixture
def cloudinit_run(namespaces: None, cloudinit_lib: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _driven("cloud-init", cloudinit_lib, tmp_path_factory)


def _paths(view: dict[str, Any], service: str) -> list[str]:
    return [f"{m} {p} {s}" for svc, m, p, s in view["requests"] if svc == service]


def test_waagent_detects_the_wire_protocol_and_parses_the_goal_state(waagent_run: dict[str, Any]) -> None:
    gs, ident = waagent_run["goal_state"], waagent_run["fabric"]["identity"]
    assert gs["incarnation"] == "1"
    assert gs["container_id"] == ident["container_id"]
    assert gs["role_instance_id"] == ident["instance_id"]
    assert gs["role_config_name"].startswith(ident["vm_id"] + ".")
    assert gs["vm_name"] == f"_{HOSTNAME}" and gs["role_name"] == f"_{HOSTNAME}"
    assert gs["tenant_name"] == ident["container_id"].replace("-", "")
    assert gs["certs"] == 0  # no Certificates URL: keys come from the OVF Value / IMDS
    assert gs["extensions"] == 0
    assert gs["status_upload_blob"].startswith("https://") and gs["status_upload_blob_type"] == "BlockBlob"
    wire = _paths(waagent_run["fabric"], "wire")
    assert "GET /?comp=versions 200" in wire
    assert "GET /machine/?comp=goalstate 200" in wire
    configs = [p for p in wire if "comp=config" in p]
    for kind in ("hostingEnvironmentConfig", "sharedConfig", "extensionsConfig"):
        assert any(f"type={kind}" in p and p.endswith(" 200") for p in configs), kind
    assert not any("comp=certificates" in p for p in wire)
    # Fast Track probed and declined, as on hosts without it.
    assert "GET /vmSettings 404" in _paths(waagent_run["fabric"], "hostga")


def test_waagent_reports_not_ready_then_ready(waagent_run: dict[str, Any]) -> None:
    view = waagent_run["fabric"]
    assert view["reports"] == [["NotReady", "Provisioning", "Starting"], ["Ready", None, None]]
    assert view["outcome"] == {"ready": "Ready"}


def test_waagent_failure_report_surfaces_its_own_description(waagent_run: dict[str, Any]) -> None:
    outcome = waagent_run["failure"]["outcome"]
    assert outcome["error"] == "AgentReportedFailure"
    assert FAILURE_TEXT in outcome["message"]


def test_waagent_hostgaplugin_status_and_telemetry(waagent_run: dict[str, Any]) -> None:
    assert waagent_run["hostga"] == {"initialized": True, "health": True}
    hostga = _paths(waagent_run["fabric"], "hostga")
    assert "GET /versions 200" in hostga and "GET /health 200" in hostga
    assert "PUT /status 200" in hostga
    assert waagent_run["fabric"]["status_uploads"] == 1
    telemetry = waagent_run["fabric"]["telemetry"]
    assert len(telemetry) == 1 and '<Provider id="69B669B9' in telemetry[0]


def test_waagent_imds_compute_and_validation(waagent_run: dict[str, Any]) -> None:
    imds, ident = waagent_run["imds"], waagent_run["fabric"]["identity"]
    assert imds["vmId"] == ident["vm_id"] and imds["name"] == HOSTNAME and imds["osType"] == "Linux"
    assert imds["validate"] == [True, ""]
    assert "GET /metadata/instance/compute?api-version=2018-02-01 200" in _paths(waagent_run["fabric"], "imds")


def test_cloudinit_reads_imds_with_extended_metadata(cloudinit_run: dict[str, Any]) -> None:
    imds, ident = cloudinit_run["imds"], cloudinit_run["fabric"]["identity"]
    assert imds["username"] == USERNAME and imds["hostname"] == HOSTNAME
    assert imds["disable_password"] is True
    assert imds["keys"] == [ident["key"]]
    assert imds["vmId"] == ident["vm_id"]
    assert imds["ppsType"] == "None"
    assert "GET /metadata/instance?api-version=2021-08-01&extended=true 200" in _paths(cloudinit_run["fabric"], "imds")


def test_cloudinit_network_config_matches_the_nic(cloudinit_run: dict[str, Any]) -> None:
    eth0 = cloudinit_run["imds"]["netcfg"]["ethernets"]["eth0"]
    assert eth0["match"]["macaddress"] == MAC
    assert eth0["dhcp4"] is True


def test_cloudinit_falls_back_to_the_older_imds_api(cloudinit_run: dict[str, Any]) -> None:
    fb = cloudinit_run["fallback"]
    assert fb["hostname"] == HOSTNAME
    imds = _paths(fb["fabric"], "imds")
    assert imds[0] == "GET /metadata/instance?api-version=2021-08-01&extended=true 400"
    assert imds[-1] == "GET /metadata/instance?api-version=2019-06-01 200"


def test_cloudinit_reports_ready(cloudinit_run: dict[str, Any]) -> None:
    view = cloudinit_run["fabric"]
    assert view["reports"] == [["Ready", None, None]]
    assert view["outcome"] == {"ready": "Ready"}
    wire = _paths(view, "wire")
    assert wire == ["GET /machine/?comp=goalstate 200", "POST /machine?comp=health 200"]
    assert cloudinit_run["report_ready_keys"] is None


def test_cloudinit_failure_report_surfaces_its_own_description(cloudinit_run: dict[str, Any]) -> None:
    view = cloudinit_run["failure"]
    assert view["reports"][0][:2] == ["NotReady", "ProvisioningFailed"]
    assert view["outcome"]["error"] == "AgentReportedFailure"
    assert FAILURE_TEXT in view["outcome"]["message"]


if __name__ == "__main__":
    driver_main(*sys.argv[1:4])
