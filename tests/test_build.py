"""The build pipeline's pieces that need no VM: provenance in the manifest, fresh user names per VM."""

from __future__ import annotations

import json
from pathlib import Path

from imagekit import build
from imagekit.base.inputs import BaseImage
from imagekit.config import distros
from imagekit.config.profile import validate_username
from imagekit.provision import launch as provision_module


def _base(key: str, meta: Path) -> BaseImage:
    """A base image record as the cache returns it; only ``key`` and ``meta`` matter to the manifest's source."""
    return BaseImage(distro_id="x", key=key, path=meta.with_name("base.qcow2"), meta=meta, packages={}, kernel="",
                     source="", root_uuid="", kernel_cmdline="", disk_size_mib=0, created="")


def test_source_for_bootstrap_records_archive_state_and_packages(tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"inputs": {"archive": {"bookworm": "abc123"}}, "apt_sources": ["deb x bookworm main"]}))
    base = _base("k1", meta)
    src = build._source(distros.get("debian-12"), base, {"packages": {"waagent": "2.7.3-1"}})
    assert src["kind"] == "bootstrap" and src["suite"] == "bookworm" and src["base_key"] == "k1"
    assert src["archive"] == {"bookworm": "abc123"} and src["packages"] == {"waagent": "2.7.3-1"}


def test_source_for_download_records_url_and_checksum(tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"inputs": {"image": {"url": "https://example.invalid/x.qcow2", "sha256": "ff"}}}))
    d = next(x for x in distros.default_table().values() if x.source.kind.value == "download")
    src = build._source(d, _base("k2", meta), {"packages": {}})
    assert src["kind"] == "download" and src["image"]["sha256"] == "ff" and src["url"] == d.source.url


def test_each_vm_gets_a_fresh_user_name() -> None:
    a, b = build._username("build"), build._username("verify")
    assert a.startswith("ikb") and b.startswith("ikv") and a[3:] != b[3:]
    # a valid Azure user name, and never provision()'s default
    validate_username(a)  # raises InputError on a name Azure would refuse
    validate_username(b)
    assert provision_module.DEFAULT_USERNAME not in (a, b)


def test_toolkit_version_names_the_commit() -> None:
    v = build._toolkit_version()
    assert v["imagekit"] and v["qemu-img"].startswith("qemu-img version")
