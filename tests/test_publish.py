"""invoke publish: the page-blob upload against a real Azurite, the gallery step against the ARM stand-in, and
the checks that refuse bad input before anything is sent.

The VHD is a real fixed VHD made by imagekit's capture code (qemu-img) from a small sparse raw disk with data
in a few places; the bytes expected on the wire are counted here independently, with SEEK_DATA/SEEK_HOLE.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imagekit.capture import VHD_NAME, make_fixed_vhd, sha256_file, verify_azure_vhd
from imagekit.core.errors import ImagekitError, InputError
from imagekit.core.paths import REPO_ROOT
from imagekit.gallery import Gallery
from imagekit.publish import PublishError, PublishOptions, StaticTokenCredential, dry_run, pages, prepare, publish
from tests import arm_standin, azurite

MiB = 1024 * 1024
DISK = 64 * MiB
# (offset, length) of the random data written into the raw disk: 4 KiB-aligned, so every 512-byte page of
# every data extent is non-zero and the data extents are exactly what must be sent.
DATA = [(0, 1 * MiB), (5 * MiB + 4096, 3 * MiB + 8192), (20 * MiB, 12 * 1024), (40 * MiB - 4096, 2 * MiB),
        (DISK - 64 * 1024, 64 * 1024)]
SUB = "0b6c8e2a-1f3d-4c5e-9a7b-2d4f6e8a0c1e"
RG = "rg-images"


def _needs_azurite() -> None:
    if not azurite.AZURITE.exists():
        pytest.skip("Azurite is not installed (./ik setup installs it from package.json)")


@pytest.fixture(scope="module")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[azurite.Azurite]:
    _needs_azurite()
    with azurite.running(tmp_path_factory.mktemp("azurite")) as az:
        yield az


@pytest.fixture
def storage_env(azurite_server: azurite.Azurite, monkeypatch: pytest.MonkeyPatch) -> azurite.Azurite:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_server.connection_string)
    return azurite_server


@pytest.fixture(scope="module")
def raw_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "disk.raw"
    rnd = random.Random(13)
    with path.open("wb") as f:
        f.truncate(DISK)
        for off, n in DATA:
            f.seek(off)
            f.write(rnd.randbytes(n))
    return path


@pytest.fixture
def gallery(tmp_path: Path, raw_disk: Path) -> Gallery:
    """A local gallery holding debian-12 12.0.1: a verified version whose VHD is the raw disk, captured."""
    g = Gallery(tmp_path / "images")
    register(g, raw_disk, "12.0.1")
    return g


def register(g: Gallery, raw: Path, version: str, *, verified: bool = True) -> Path:
    with g.staging() as st:
        vhd = st.path / VHD_NAME
        size = make_fixed_vhd(raw, vhd)
        verify_azure_vhd(vhd, expected_size=size)
        st_ = vhd.stat()
        manifest = {
            "distro_version": "12", "family": "debian", "distro_name": "Debian 12",
            "build_options": {"skip_deprovision": False, "skip_scan": False},
            "leak_scan": {"findings": 0, "artifact": VHD_NAME}, "deprovision": {"steps": []},
            "checks": {"build": [], "verify": [{"id": "provisioning.user", "status": "pass" if verified else "fail",
                                                "summary": "", "seconds": 0.1}]},
            "artifacts": [{"name": VHD_NAME, "format": "vhd-fixed", "size": st_.st_size,
                           "allocated": st_.st_blocks * 512, "virtual_size": size, "sha256": sha256_file(vhd)}],
        }
        iv = g.register("debian-12", st, manifest, version=None if not version else _v(version))
    return iv.path / VHD_NAME


def _v(text: str) -> Any:
    from imagekit.core.versions import Version

    return Version.parse(text)


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The file's data extents, found here with SEEK_DATA/SEEK_HOLE (not with imagekit's own helper)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


@dataclass
class Wire:
    """What the SDK sent and what Azurite acknowledged, seen by the SDK's per-request hooks."""

    fail_after: int | None = None  # raise in the hook for every Put Page after this many
    sent: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each Put Page sent
    sent_bytes: int = 0
    acked: list[tuple[int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def _range(self, headers: Any) -> tuple[int, int] | None:
        value = headers.get("x-ms-range") or headers.get("Range")
        if not value:
            return None
        a, b = value.split("=")[1].split("-")
        return int(a), int(b) + 1

    def on_request(self, pipeline_request: Any) -> None:
        req = pipeline_request.http_request
        with self.lock:
            self.requests.append((req.method, req.url))
        if req.method != "PUT" or "comp=page" not in req.url:
            return
        assert req.headers.get("x-ms-page-write") == "update"
        assert req.headers.get("Content-MD5"), "every Put Page carries a transactional MD5"
        r = self._range(req.headers)
        assert r is not None and r[0] % 512 == 0 and r[1] % 512 == 0 and r[1] - r[0] <= 4 * MiB
        with self.lock:
            if self.fail_after is not None and len(self.sent) >= self.fail_after:
                raise ConnectionAbortedError("the test cut the connection")
            self.sent.append(r)
            self.sent_bytes += len(req.body or b"") if isinstance(req.body, bytes) else int(
                req.headers["Content-Length"])

    def on_response(self, pipeline_response: Any) -> None:
        req, resp = pipeline_response.http_request, pipeline_response.http_response
        if req.method == "PUT" and "comp=page" in req.url and resp.status_code == 201:
            r = self._range(req.headers)
            assert r is not None
            with self.lock:
                self.acked.append(r)

    def kwargs(self) -> dict[str, Any]:
        return {"raw_request_hook": self.on_request, "raw_response_hook": self.on_response}


def opts(container: str, **kw: Any) -> PublishOptions:
    base: dict[str, Any] = {"distro": "debian-12", "version": "12.0.1", "container": container, "blob_only": True,
                            "workers": 4, "request_size": 256 * 1024}
    base.update(kw)
    return PublishOptions(**base)


def container_name() -> str:
    return f"vhds-{secrets.token_hex(4)}"


def download(az: azurite.Azurite, container: str, blob: str) -> bytes:
    from azure.storage.blob import BlobServiceClient

    svc = BlobServiceClient.from_connection_string(az.connection_string)
    return bytes(svc.get_blob_client(container, blob).download_blob().readall())


# -- the ranges a sparse VHD needs ---------------------------------------------------------------------------


def test_plan_sends_the_data_extents_and_skips_zero_pages(tmp_path: Path) -> None:
    path = tmp_path / "f.raw"
    with path.open("wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        block = bytearray(os.urandom(64 * 1024))
        block[4096:8192] = bytes(4096)  # eight zero pages written as data: in the extent, never sent
        f.write(block)
        f.flush()
        os.fsync(f.fileno())
    extents = data_extents(path)
    assert sum(e - s for s, e in extents) >= 64 * 1024  # the zeros are allocated data, not a hole
    p = pages.plan(path, 16 * 1024)
    assert p.data_bytes == 60 * 1024
    assert [(r.start, r.end) for r in p.ranges] == [(MiB, MiB + 4096), (MiB + 8192, MiB + 8192 + 16384),
                                                    (MiB + 24576, MiB + 40960), (MiB + 40960, MiB + 57344),
                                                    (MiB + 57344, MiB + 65536)]


def test_plan_of_a_captured_vhd_is_its_data_extents(gallery: Gallery) -> None:
    vhd = gallery.get("debian-12", "12.0.1").path / VHD_NAME
    extents = data_extents(vhd)
    p = pages.plan(vhd)
    assert p.size == DISK + 512 and p.extent_bytes == sum(e - s for s, e in extents)
    assert p.data_bytes == sum(n for _, n in DATA) + 512  # the data and the footer, nothing else
    assert all(r.length <= 4 * MiB and r.start % 512 == 0 and r.end % 512 == 0 for r in p.ranges)


# -- upload against Azurite -------------------------------------------------------------------------------


def test_upload_sends_only_the_data_and_the_blob_reads_back_equal(gallery: Gallery, storage_env: azurite.Azurite
                                                                   ) -> None:
    c = container_name()
    p = prepare(opts(c), gallery)
    vhd = p.source.vhd
    wire = Wire()
    res = publish(p, gallery=gallery, blob_client_kwargs=wire.kwargs())
    expected = sum(e - s for s, e in data_extents(vhd))
    assert wire.sent_bytes == expected == res.upload.sent_bytes
    assert res.upload.requests == len(wire.sent) == len(p.plan.ranges)
    assert pages.merge(wire.sent) == pages.merge(data_extents(vhd))
    remote = download(storage_env, c, p.blob_name)
    assert len(remote) == vhd.stat().st_size
    assert hashlib.sha256(remote).hexdigest() == sha256_file(vhd) == p.source.sha256
    # the blob's metadata names the image; the local gallery records where it went
    from azure.storage.blob import BlobServiceClient

    props = BlobServiceClient.from_connection_string(storage_env.connection_string).get_blob_client(
        c, p.blob_name).get_blob_properties()
    assert props.blob_type == "PageBlob" and props.metadata["imagekitsha256"] == p.source.sha256
    rec = gallery.get("debian-12", "12.0.1").published
    assert len(rec) == 1 and rec[0]["blob_url"] == res.upload.url and rec[0]["state"] == "blob-verified"


def test_publishing_again_sends_nothing(gallery: Gallery, storage_env: azurite.Azurite) -> None:
    c = container_name()
    publish(prepare(opts(c), gallery), gallery=gallery)
    wire = Wire()
    res = publish(prepare(opts(c), gallery), gallery=gallery, blob_client_kwargs=wire.kwargs())
    assert wire.sent == [] and res.upload.already_verified
    assert [m for m, _ in wire.requests] == ["HEAD"]  # the blob's properties, nothing more
    assert len(gallery.get("debian-12", "12.0.1").published) == 1


def test_an_interrupted_upload_resumes_without_resending(gallery: Gallery, storage_env: azurite.Azurite) -> None:
    c = container_name()
    p = prepare(opts(c), gallery)
    first = Wire(fail_after=7)
    with pytest.raises(ConnectionAbortedError):
        publish(p, gallery=gallery, blob_client_kwargs=first.kwargs())
    assert 0 < len(first.acked) < len(p.plan.ranges)
    assert not gallery.get("debian-12", "12.0.1").published
    second = Wire()
    res = publish(prepare(opts(c), gallery), gallery=gallery, blob_client_kwargs=second.kwargs())
    assert not set(second.sent) & set(first.acked), "a finished range was sent again"
    assert pages.merge(first.acked + second.sent) == pages.merge((r.start, r.end) for r in p.plan.ranges)
    assert res.upload.resumed_bytes == sum(e - s for s, e in first.acked)
    assert res.upload.sent_bytes == p.plan.data_bytes - res.upload.resumed_bytes
    remote = download(storage_env, c, p.blob_name)
    assert hashlib.sha256(remote).hexdigest() == p.source.sha256


def test_an_existing_blob_with_other_content_is_refused(gallery: Gallery, storage_env: azurite.Azurite,
                                                        raw_disk: Path, tmp_path: Path) -> None:
    c = container_name()
    p = prepare(opts(c), gallery)
    from azure.storage.blob import BlobServiceClient

    svc = BlobServiceClient.from_connection_string(storage_env.connection_string)
    svc.create_container(c)
    other = svc.get_blob_client(c, p.blob_name)
    other.create_page_blob(p.plan.size, metadata={"imagekitsha256": "0" * 64})
    other.upload_page(b"\x01" * 512, offset=0, length=512)
    wire = Wire()
    with pytest.raises(InputError, match=r"already exists with other content.*SHA-256 0{64}") as e:
        publish(p, gallery=gallery, blob_client_kwargs=wire.kwargs())
    assert "--overwrite" in str(e.value) and wire.sent == []
    svc.get_blob_client(c, "block.vhd").upload_blob(b"not a page blob")
    with pytest.raises(InputError, match="BlockBlob blob, not a page blob"):
        publish(prepare(opts(c, blob_name="block.vhd"), gallery), gallery=gallery)
    res = publish(prepare(opts(c, overwrite=True), gallery), gallery=gallery)
    assert res.upload.sent_bytes == p.plan.data_bytes
    assert hashlib.sha256(download(storage_env, c, p.blob_name)).hexdigest() == p.source.sha256


def test_verification_catches_a_blob_changed_behind_our_back(gallery: Gallery, storage_env: azurite.Azurite) -> None:
    """A blob marked as ours but with one page altered (and its verified mark removed) fails verification."""
    c = container_name()
    p = prepare(opts(c), gallery)
    publish(p, gallery=gallery)
    from azure.storage.blob import BlobServiceClient

    b = BlobServiceClient.from_connection_string(storage_env.connection_string).get_blob_client(c, p.blob_name)
    start = p.plan.ranges[3].start
    b.upload_page(b"\xff" * 512, offset=start, length=512)
    b.set_blob_metadata({"imagekitsha256": p.source.sha256})
    with pytest.raises(PublishError, match=r"content differs from the VHD at bytes (\d+)-(\d+)") as e:
        publish(p, gallery=gallery)
    import re

    m = re.search(r"at bytes (\d+)-(\d+)", str(e.value))
    assert m and int(m[1]) <= start < int(m[2])


def test_a_changed_local_file_is_refused(gallery: Gallery, storage_env: azurite.Azurite) -> None:
    vhd = gallery.get("debian-12", "12.0.1").path / VHD_NAME
    vhd.chmod(0o644)
    with vhd.open("r+b") as f:
        f.seek(5 * MiB + 4096)
        f.write(b"tampered")
    with pytest.raises(InputError, match=r"refusing to publish: .*disk\.vhd: sha256 [0-9a-f]{64}, manifest says"):
        prepare(opts(container_name()), gallery)


def test_no_secret_is_logged(gallery: Gallery, storage_env: azurite.Azurite, caplog: pytest.LogCaptureFixture,
                             capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    p = prepare(opts(container_name()), gallery)
    publish(p, gallery=gallery)
    print("\n".join(dry_run(p)))
    out = capsys.readouterr()
    text = caplog.text + out.out + out.err + (gallery.root / "index.json").read_text()
    assert azurite.KEY not in text and azurite.KEY[:20] not in text


def test_malformed_connection_string_is_not_echoed(gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountKey=SECRETSECRET;garbage")
    p = prepare(opts(container_name(), storage_account="acct1"), gallery)
    with pytest.raises(ImagekitError) as e:
        publish(p, gallery=gallery)
    assert "SECRETSECRET" not in str(e.value)


# -- the gallery step against the ARM stand-in -----------------------------------------------------------


@pytest.fixture
def arm(monkeypatch: pytest.MonkeyPatch) -> Iterator[arm_standin.StandIn]:
    s = arm_standin.StandIn().start()
    s.add_gallery(SUB, RG, "imagekitgallery", "westeurope")
    try:
        yield s
    finally:
        s.stop()


def gallery_opts(c: str, arm: arm_standin.StandIn, **kw: Any) -> PublishOptions:
    base: dict[str, Any] = {"blob_only": False, "gallery": "imagekitgallery", "resource_group": RG,
                            "image_definition": "debian-12", "subscription": SUB, "arm_endpoint": arm.base_url,
                            "polling_interval": 0.0}
    return opts(c, **{**base, **kw})


def run_gallery(p: Any, g: Gallery, arm: arm_standin.StandIn, token: str = arm_standin.TOKEN) -> Any:
    return publish(p, gallery=g, arm_credential=StaticTokenCredential(token),
                   arm_client_kwargs={"connection_verify": str(arm.ca_file)})


def test_gallery_version_from_the_blob(gallery: Gallery, storage_env: azurite.Azurite,
                                       arm: arm_standin.StandIn) -> None:
    c = container_name()
    p = prepare(gallery_opts(c, arm, target_regions=["westeurope=2", "northeurope"], end_of_life="2099-12-31",
                             exclude_from_latest=True), gallery)
    res = run_gallery(p, gallery, arm)
    puts = arm.requests("PUT")
    assert [r.path.rsplit("/", 2)[-2] for r in puts] == ["images", "versions"]
    assert all(r.query["api-version"] == ["2026-03-03"] for r in arm.requests())
    image = puts[0].body["properties"]
    assert image["osType"] == "Linux" and image["osState"] == "Generalized" and image["hyperVGeneration"] == "V1"
    assert image["identifier"] == {"publisher": "imagekit", "offer": "debian", "sku": "debian-12"}  # the definition
    v = puts[1].body["properties"]
    assert v["storageProfile"]["osDiskImage"]["source"] == {
        "uri": res.upload.url,
        "storageAccountId": f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Storage/"
                            "storageAccounts/devstoreaccount1"}
    prof = v["publishingProfile"]
    assert [(r["name"], r["regionalReplicaCount"]) for r in prof["targetRegions"]] == [("westeurope", 2),
                                                                                      ("northeurope", 1)]
    assert prof["endOfLifeDate"] == "2099-12-31T00:00:00Z" and prof["excludeFromLatest"] is True
    # the operation was polled until it succeeded, then the version read back
    ops = [r for r in arm.requests("GET") if "/operations/" in r.path]
    assert len(ops) >= 4
    assert res.gallery.state == "Succeeded" and res.gallery.version_id.endswith("/versions/12.0.1")
    assert res.gallery.definition_created and res.gallery.version_created
    rec = gallery.get("debian-12", "12.0.1").published
    assert len(rec) == 1 and rec[0]["gallery_version_id"] == res.gallery.version_id
    assert rec[0]["regions"] == ["westeurope", "northeurope"] and rec[0]["state"] == "Succeeded"

    # again: the blob is found verified and the version found succeeded; nothing is PUT, one record stays
    before = len(arm.requests("PUT"))
    wire = Wire()
    again = publish(prepare(gallery_opts(c, arm, target_regions=["westeurope=2", "northeurope"]), gallery),
                    gallery=gallery, arm_credential=StaticTokenCredential(arm_standin.TOKEN),
                    arm_client_kwargs={"connection_verify": str(arm.ca_file)}, blob_client_kwargs=wire.kwargs())
    assert len(arm.requests("PUT")) == before and wire.sent == []
    assert again.gallery is not None and not again.gallery.version_created
    assert len(gallery.get("debian-12", "12.0.1").published) == 1


def test_blob_only_then_the_gallery_keeps_one_record(gallery: Gallery, storage_env: azurite.Azurite,
                                                     arm: arm_standin.StandIn) -> None:
    c = container_name()
    publish(prepare(opts(c), gallery), gallery=gallery)
    assert [r["state"] for r in gallery.get("debian-12", "12.0.1").published] == ["blob-verified"]
    wire = Wire()
    res = publish(prepare(gallery_opts(c, arm), gallery), gallery=gallery,
                  arm_credential=StaticTokenCredential(arm_standin.TOKEN),
                  arm_client_kwargs={"connection_verify": str(arm.ca_file)}, blob_client_kwargs=wire.kwargs())
    assert wire.sent == [] and res.gallery is not None
    recs = gallery.get("debian-12", "12.0.1").published
    assert [(r["state"], r["gallery_version_id"]) for r in recs] == [("Succeeded", res.gallery.version_id)]
    # another blob of the same version is another record
    publish(prepare(opts(container_name()), gallery), gallery=gallery)
    assert len(gallery.get("debian-12", "12.0.1").published) == 2


def test_missing_gallery_is_a_clear_error(gallery: Gallery, storage_env: azurite.Azurite,
                                          arm: arm_standin.StandIn) -> None:
    c = container_name()
    p = prepare(gallery_opts(c, arm, gallery="nosuchgallery"), gallery)
    with pytest.raises(PublishError, match="gallery nosuchgallery does not exist in resource group rg-images") as e:
        run_gallery(p, gallery, arm)
    assert "az sig create" in str(e.value)
    from azure.storage.blob import BlobServiceClient

    # found before the upload: nothing was sent
    assert not BlobServiceClient.from_connection_string(storage_env.connection_string).get_container_client(
        c).exists()


def test_conflict_is_a_clear_error(gallery: Gallery, storage_env: azurite.Azurite, arm: arm_standin.StandIn,
                                   raw_disk: Path) -> None:
    """The version exists from another blob: ARM answers 409, and the message says so."""
    c = container_name()
    run_gallery(prepare(gallery_opts(c, arm), gallery), gallery, arm)
    with pytest.raises(PublishError, match=r"image version imagekitgallery/debian-12/12.0.1: Azure refused it as a "
                                           r"conflict: Changing property "
                                           r"'galleryImageVersion.properties.storageProfile' is not allowed. "
                                           r"\(HTTP 409, PropertyChangeNotAllowed\)"):
        run_gallery(prepare(gallery_opts(c, arm, blob_name="other.vhd"), gallery), gallery, arm)


def test_a_duplicate_identifier_is_a_clear_error(gallery: Gallery, storage_env: azurite.Azurite,
                                                 arm: arm_standin.StandIn) -> None:
    c = container_name()
    run_gallery(prepare(gallery_opts(c, arm), gallery), gallery, arm)
    run_gallery(prepare(gallery_opts(c, arm, image_definition="debian-12-b"), gallery), gallery, arm)  # own sku
    with pytest.raises(PublishError, match=r"image definition imagekitgallery/debian-12-c: Azure refused it as a "
                                           r"conflict: Gallery image 'debian-12' already has the publisher, offer "
                                           r"and SKU imagekit/debian/debian-12.*\(HTTP 409, Conflict\)"):
        run_gallery(prepare(gallery_opts(c, arm, image_definition="debian-12-c", sku="debian-12"), gallery),
                    gallery, arm)


def test_failed_provisioning_is_a_clear_error(gallery: Gallery, storage_env: azurite.Azurite,
                                              arm: arm_standin.StandIn) -> None:
    c = container_name()
    p = prepare(gallery_opts(c, arm), gallery)
    from azure.storage.blob import BlobClient

    url = BlobClient.from_connection_string(storage_env.connection_string, c, p.blob_name).url
    arm.state.bad_blobs[url] = "The source blob is not a valid VHD: its footer could not be read."
    with pytest.raises(PublishError) as e:
        run_gallery(p, gallery, arm)
    print(e.value)
    assert str(e.value).startswith("image version imagekitgallery/debian-12/12.0.1: ")
    assert "The source blob is not a valid VHD: its footer could not be read." in str(e.value)
    assert not gallery.get("debian-12", "12.0.1").published


def test_bad_arm_token_is_refused(gallery: Gallery, storage_env: azurite.Azurite, arm: arm_standin.StandIn) -> None:
    p = prepare(gallery_opts(container_name(), arm), gallery)
    with pytest.raises(PublishError, match=r"gallery imagekitgallery: not authorized: Authentication failed.*"
                                           r"\(HTTP 401, AuthenticationFailed\)"):
        run_gallery(p, gallery, arm, token="wrong")


def test_dry_run_prints_the_requests_and_touches_nothing(gallery: Gallery, storage_env: azurite.Azurite,
                                                         arm: arm_standin.StandIn) -> None:
    c = container_name()
    p = prepare(gallery_opts(c, arm, location="westeurope"), gallery)
    text = "\n".join(dry_run(p))
    assert f"non-zero pages to send {p.plan.data_bytes} bytes" in text and f"file size {DISK + 512}" in text
    assert (f"PUT {arm.base_url}/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/galleries/"
            "imagekitgallery/images/debian-12/versions/12.0.1?api-version=2026-03-03") in text
    assert arm.requests() == []
    from azure.storage.blob import BlobServiceClient

    assert not BlobServiceClient.from_connection_string(storage_env.connection_string).get_container_client(
        c).exists()
    # the body printed is the body a real run sends
    body_lines = text.split("versions/12.0.1?api-version=2026-03-03\n")[-1].splitlines()
    printed = json.loads("\n".join(line[2:] for line in body_lines))
    run_gallery(p, gallery, arm)
    assert arm.requests("PUT")[-1].body == printed


# -- bad input: refused before anything is sent -----------------------------------------------------------


@pytest.mark.parametrize(("kw", "message"), [
    ({"version": "12.0.9"}, "debian-12 has no image version 12.0.9; registered: 12.0.1"),
    ({"version": "12.0.2147483648"}, "--version: version patch 2147483648 is out of range"),
    ({"version": "1.2"}, "--version: bad image version '1.2'"),
    ({"storage_account": "My_Account"}, "bad storage account name 'My_Account'"),
    ({"storage_account": "ab"}, "bad storage account name 'ab'"),
    ({"container": "Vhds"}, "bad container name 'Vhds'"),
    ({"container": "vhds--x"}, "bad container name 'vhds--x'"),
    ({"container": "-vhds"}, "bad container name '-vhds'"),
    ({"end_of_life": "2020-01-01"}, "--end-of-life: end-of-life date 2020-01-01 is not after today"),
    ({"end_of_life": "2030-02-30"}, "no such day"),
    ({"blob_only": False, "gallery": "bad gallery", "resource_group": RG, "image_definition": "d",
      "subscription": SUB}, "bad gallery name 'bad gallery'"),
    ({"blob_only": False, "gallery": "g", "resource_group": RG, "image_definition": "-d", "subscription": SUB},
     "bad image definition name '-d'"),
    ({"blob_only": False, "gallery": "g", "resource_group": RG, "image_definition": "d", "subscription": "x"},
     "bad subscription id 'x'"),
    ({"blob_only": False}, "--gallery, --resource-group, --image-definition required"),
    ({"target_regions": ["westeurope=0"]}, "bad replica count"),
])
def test_bad_input_is_refused_before_any_upload(gallery: Gallery, kw: dict[str, Any], message: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_SUBSCRIPTION_ID", raising=False)
    base = {"storage_account": "imagekitstore", "container": "vhds"}
    base.update(kw)
    container = base.pop("container")
    with pytest.raises(InputError) as e:
        prepare(opts(container, **base), gallery)
    assert message in str(e.value)


def test_unverified_version_is_refused(tmp_path: Path, raw_disk: Path) -> None:
    g = Gallery(tmp_path / "images")
    register(g, raw_disk, "12.0.2", verified=False)
    with pytest.raises(InputError, match=r"not a verified version: its verify boot did not pass: provisioning.user"):
        prepare(opts("vhds", version="12.0.2", storage_account="imagekitstore"), g)


def test_missing_credentials_are_a_clear_error(gallery: Gallery, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """No connection string, no environment credential, no managed identity, no az login: DefaultAzureCredential
    finds nothing, and the error names the ways to sign in, before any upload."""
    for k in list(os.environ):
        if k.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))  # no az CLI profile
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://127.0.0.1:9")  # managed identity: refused
    p = prepare(opts("vhds", storage_account="imagekitstore"), gallery)
    with pytest.raises(InputError, match="no Azure credentials for the storage account") as e:
        publish(p, gallery=gallery)
    assert "AZURE_STORAGE_CONNECTION_STRING" in str(e.value) and "az login" in str(e.value)
    # as the task runs it, the credentials are checked before the pass over the VHD: a changed VHD is not
    # what is reported
    vhd = gallery.get("debian-12", "12.0.1").path / VHD_NAME
    vhd.chmod(0o644)
    with vhd.open("r+b") as f:
        f.write(b"changed")
    with pytest.raises(InputError, match="no Azure credentials for the storage account"):
        prepare(opts("vhds", storage_account="imagekitstore"), gallery, connect=True)


# -- the task -----------------------------------------------------------------------------------------------


def test_publish_task_end_to_end(gallery: Gallery, storage_env: azurite.Azurite, arm: arm_standin.StandIn,
                                 tmp_path: Path) -> None:
    """invoke publish as a user runs it: options, the ARM endpoint and token from the environment, the CA
    bundle requests honours, the result printed, and invoke images showing where the version went."""
    env = dict(os.environ, IMAGEKIT_IMAGES=str(gallery.root), IMAGEKIT_ARM_ENDPOINT=arm.base_url,
               IMAGEKIT_ARM_ACCESS_TOKEN=arm_standin.TOKEN, REQUESTS_CA_BUNDLE=str(arm.ca_file),
               IMAGEKIT_ARM_POLLING_INTERVAL="0")
    invoke = [str(Path(sys.executable).parent / "invoke"), "-r", str(REPO_ROOT)]
    argv = [*invoke, "publish", "--distro", "debian-12", "--version", "12.0.1", "--container", container_name(),
            "--gallery", "imagekitgallery", "--resource-group", RG, "--image-definition", "debian-12",
            "--subscription", SUB, "--target-region", "westeurope=2"]
    dry = subprocess.run([*argv, "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "would upload" in dry.stdout and "PUT https://127.0.0.1" in dry.stdout and arm.requests() == []
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "published debian-12 12.0.1" in res.stdout and "Succeeded" in res.stdout
    assert azurite.KEY not in res.stdout + res.stderr
    shown = subprocess.run([*invoke, "images"], env=env, capture_output=True, text=True, timeout=60)
    assert "published: Succeeded" in shown.stdout and "/versions/12.0.1" in shown.stdout
    bad = subprocess.run([*argv[:-2], "--end-of-life", (dt.date.today() - dt.timedelta(days=1)).isoformat()],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "imagekit: error: --end-of-life" in bad.stderr


def test_ctrl_c_in_the_task_then_a_rerun_resumes(tmp_path: Path, storage_env: azurite.Azurite) -> None:
    """SIGINT to a running invoke publish once the blob has its first pages: exit 130, and the next run sends
    only what the blob's page ranges (read after the first process ended) lack."""
    raw = tmp_path / "big.raw"
    rnd = random.Random(5)
    with raw.open("wb") as f:
        f.truncate(256 * MiB)
        for i in range(6):
            f.seek(i * 40 * MiB)
            f.write(rnd.randbytes(4 * MiB))
    g = Gallery(tmp_path / "images")
    register(g, raw, "12.0.3")
    c = container_name()
    env = dict(os.environ, IMAGEKIT_IMAGES=str(g.root))
    argv = [str(Path(sys.executable).parent / "invoke"), "-r", str(REPO_ROOT), "publish", "--distro", "debian-12",
            "--version", "12.0.3", "--container", c, "--blob-only", "--workers", "1"]
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.blob import BlobServiceClient

    b = BlobServiceClient.from_connection_string(storage_env.connection_string).get_blob_client(
        c, "debian-12-12.0.3.vhd")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:  # wait for the first pages to land, then Ctrl-C
            try:
                if list(b.list_page_ranges()):
                    break
            except ResourceNotFoundError:
                pass
            time.sleep(0.02)  # polling, not a timed assertion
        proc.send_signal(2)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "upload stopped after" in err and "run publish again to resume" in err
    done = pages.merge((int(r.start or 0), int(r.end or 0) + 1) for r in b.list_page_ranges())
    done_bytes = sum(e - s for s, e in done)
    plan = pages.plan(g.get("debian-12", "12.0.3").path / VHD_NAME)
    assert 0 < done_bytes < plan.data_bytes
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"sent {plan.data_bytes - done_bytes} bytes" in again.stdout
    assert f"({done_bytes} bytes were already there)" in again.stdout
    assert hashlib.sha256(b.download_blob().readall()).hexdigest() == sha256_file(
        g.get("debian-12", "12.0.3").path / VHD_NAME)


def test_progress_bar_on_a_terminal(gallery: Gallery, storage_env: azurite.Azurite) -> None:
    """On a terminal (stderr a pty) the upload and the verification draw tqdm bars up to the data bytes; piped,
    nothing of the kind is printed."""
    import pty

    env = dict(os.environ, IMAGEKIT_IMAGES=str(gallery.root), COLUMNS="120")
    argv = [str(Path(sys.executable).parent / "invoke"), "-r", str(REPO_ROOT), "publish", "--distro", "debian-12",
            "--version", "12.0.1", "--container", container_name(), "--blob-only"]
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        os.close(master)
    tty = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, tty
    data_mib = f"{pages.plan(gallery.get('debian-12', '12.0.1').path / VHD_NAME).data_bytes / MiB:.2f}M"
    assert "upload: 100%" in tty and "verify: 100%" in tty and data_mib in tty
    assert "%|" not in out
    piped = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "%|" not in piped.stderr + piped.stdout
