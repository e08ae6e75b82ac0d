"""End to end: ``build`` for both Debian 12 agents, and a non-deprovisioned image caught twice.

These boot two VMs per build under QEMU (TCG here), so they carry the ``vm`` marker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagekit import capture
from imagekit.build import BuildOptions, build
from imagekit.config import distros
from imagekit.core.errors import BuildError
from imagekit.gallery import Gallery
from imagekit.scan import LeakFound

pytestmark = pytest.mark.vm


def _opts(tmp_path: Path, **kw: object) -> BuildOptions:
    return BuildOptions(gallery=Gallery(tmp_path / "images"), report_dir=tmp_path / "reports",
                        workdir=tmp_path / "work", **kw)  # type: ignore[arg-type]


def _assert_built(tmp_path: Path, distro: str, agent: str) -> None:
    res = build(distros.get(distro), _opts(tmp_path))
    g = Gallery(tmp_path / "images")
    assert g.latest(distro).version == res.image.version
    m = json.loads((res.path / "manifest.json").read_text())
    assert m["distro"] == distro and m["version"] == res.version
    assert f"linux-image-{m['kernel']}" in m["source"]["packages"]  # the running kernel is a listed package
    assert agent in m["agent"]["versions"]
    assert m["source"]["kind"] == "bootstrap" and "openssh-server" in m["source"]["packages"]
    for stage in ("build", "verify"):
        assert m["checks"][stage] and all(c["status"] in ("pass", "skip") for c in m["checks"][stage]), m["checks"]
    assert m["deprovision"]["ok"] is True
    assert m["leak_scan"]["findings"] == 0
    # the verify VM was a different machine: new UUID, user and hostname
    b, v = m["vms"]["build"], m["vms"]["verify"]
    assert b["vm_uuid"] != v["vm_uuid"] and b["username"] != v["username"] and b["hostname"] != v["hostname"]
    for stage in ("base image", "build VM: checks", "deprovision", "shutdown (QMP powerdown)", "capture",
                  "offline leak scan", "verify boot (new VM)", "verify VM: checks"):
        assert stage in m["timings"]["stages"], m["timings"]
    capture.verify_artifacts(res.path, m["artifacts"])
    footer = capture.verify_azure_vhd(res.path / "disk.vhd")
    assert footer.disk_type_name == "fixed" and footer.current_size % (1 << 20) == 0
    vhd = next(a for a in m["artifacts"] if a["name"] == "disk.vhd")
    assert vhd["allocated"] < vhd["size"] // 4  # sparse on the host


def test_build_debian_12(tmp_path: Path) -> None:
    _assert_built(tmp_path, "debian-12", "waagent")


def test_build_debian_12_cloudinit(tmp_path: Path) -> None:
    _assert_built(tmp_path, "debian-12-cloudinit", "cloud-init")


def test_skipped_deprovision_is_caught_by_the_offline_scan(tmp_path: Path) -> None:
    with pytest.raises(LeakFound) as exc:
        build(distros.get("debian-12"), _opts(tmp_path, skip_deprovision=True))
    text = str(exc.value)
    for leak in ("/var/lib/waagent/provisioned", "/var/lib/waagent/ovf-env.xml", "/etc/ssh/ssh_host_",
                 "/home/ikb"):
        assert leak in text, text
    assert Gallery(tmp_path / "images").versions() == []
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".staging-")]


def test_skipped_deprovision_is_caught_by_the_verify_boot(tmp_path: Path) -> None:
    """With the scan bypassed too, the new VM must fail to provision: waagent finds its old provisioned
    marker, only notes the new VM id, reports Ready without provisioning and never creates the new user."""
    with pytest.raises(BuildError, match="did not provision again") as exc:
        build(distros.get("debian-12"), _opts(tmp_path, skip_deprovision=True, skip_scan=True))
    text = str(exc.value)
    # waagent said Ready without its 'NotReady (Provisioning)' report: the old marker short-circuited
    # provisioning, so the new user was never created — caught without waiting for SSH to time out
    assert "debian-12-verify: waagent reported Ready without provisioning" in text, text
    assert "/var/lib/waagent/provisioned" in text, text
    assert Gallery(tmp_path / "images").versions() == []
