"""The download source, against a local HTTP server (127.0.0.1 only) started by the tests.

Fast tests cover checksum files, decompression and the resumable download with small files; the ``vm``
tests serve a real image made by the bootstrap path (compressed, with its checksum file) and run the
whole path: download with a dropped connection and resume, verification, conversion, offline agent
configuration — and a corrupted image, a 404, and an agent that has to be installed.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import lzma
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from imagekit.base import cache, customize, disk, ensure_base
from imagekit.base.download import (
    DownloadError,
    decompress,
    download_resumable,
    expected_digest,
    fetch_verified,
    parse_checksums,
)
from imagekit.base.inspect import open_image
from imagekit.config import distros
from imagekit.config.distros import Compression, Distro, Family, ImageFormat, Source, SourceKind
from imagekit.core.errors import BuildError

# --- a local vendor site ------------------------------------------------------------------------------


class Site:
    """Files by URL path; paths in ``drop_once`` lose their connection half-way on the first full GET."""

    def __init__(self) -> None:
        self.files: dict[str, Path | bytes] = {}
        self.drop_once: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (path, Range header)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range", "")
                site.requests.append((self.path, rng))
                body = site.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                size = body.stat().st_size if isinstance(body, Path) else len(body)
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng)
                if m:
                    start = int(m[1])
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(size - start))
                self.end_headers()
                stop = size
                drop = not m and self.path in site.drop_once
                if drop:
                    site.drop_once.discard(self.path)
                    stop = size // 2
                self._send(body, start, stop)
                if drop:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True

            def _send(self, body: Path | bytes, start: int, stop: int) -> None:
                if isinstance(body, bytes):
                    self.wfile.write(body[start:stop])
                    return
                with body.open("rb") as f:
                    f.seek(start)
                    left = stop - start
                    while left > 0:
                        chunk = f.read(min(1 << 20, left))
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        left -= len(chunk)

        return Handler

    def __enter__(self) -> Site:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site() -> Iterator[Site]:
    with Site() as s:
        yield s


# --- checksum files ------------------------------------------------------------------------------------

D1 = "a" * 64
D2 = "b" * 64


def test_checksum_files_in_gnu_bsd_and_bare_form() -> None:
    gnu = f"{D1}  image-a.qcow2\n{D2} *./sub/image-b.img.xz\n"
    assert parse_checksums(gnu, "sha256") == {"image-a.qcow2": D1, "image-b.img.xz": D2}
    bsd = f"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n# comment\nSHA256 (image-a.qcow2) = {D1.upper()}\n" \
          f"SHA512 (image-a.qcow2) = {'c' * 128}\n-----BEGIN PGP SIGNATURE-----\nxyz\n"
    assert parse_checksums(bsd, "sha256") == {"image-a.qcow2": D1}
    assert parse_checksums(bsd, "sha512") == {"image-a.qcow2": "c" * 128}
    assert expected_digest(f"{D2}\n", "http://x/dir/any.img", "sha256") == D2
    assert expected_digest(gnu, "http://x/dir/image-a.qcow2?x=1", "sha256") == D1


def test_image_missing_from_the_checksum_file_is_named() -> None:
    with pytest.raises(DownloadError) as exc:
        expected_digest(f"{D1}  other.img\n", "http://x/dir/mine.img", "sha256", "http://x/dir/SUMS")
    assert "mine.img" in str(exc.value) and "other.img" in str(exc.value)


# --- decompression ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", list(Compression))
def test_decompression_per_entry(tmp_path: Path, compression: Compression) -> None:
    payload = b"disk image bytes\n" * 5000
    src = tmp_path / "in"
    if compression is Compression.ZST:
        (tmp_path / "plain").write_bytes(payload)
        subprocess.run(["zstd", "-q", str(tmp_path / "plain"), "-o", str(src)], check=True)
    else:
        packers: dict[Compression, Callable[[bytes], bytes]] = {
            Compression.NONE: bytes, Compression.GZ: gzip.compress, Compression.XZ: lzma.compress,
            Compression.BZ2: bz2.compress}
        packer = packers[compression]
        src.write_bytes(packer(payload))
    decompress(src, tmp_path / "out", compression)
    assert (tmp_path / "out").read_bytes() == payload


def test_corrupt_compressed_data_is_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "in.xz"
    src.write_bytes(b"this is not xz at all")
    with pytest.raises(DownloadError, match="not valid xz"):
        decompress(src, tmp_path / "out", Compression.XZ)


# --- HTTP ---------------------------------------------------------------------------------------------------


def test_dropped_connection_is_resumed_with_range(site: Site, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40000
    site.files["/img"] = data
    site.drop_once.add("/img")
    part = tmp_path / "img.part"
    download_resumable(site.base + "/img", part, sleep=lambda s: None)
    assert part.read_bytes() == data
    assert site.requests[0] == ("/img", "")
    assert site.requests[1] == ("/img", f"bytes={len(data) // 2}-")


def test_partial_file_from_an_earlier_run_is_resumed(site: Site, tmp_path: Path) -> None:
    data = b"x" * 300000 + b"y" * 300000
    site.files["/img"] = data
    part = tmp_path / "img.part"
    part.write_bytes(data[:123456])
    download_resumable(site.base + "/img", part)
    assert part.read_bytes() == data and site.requests == [("/img", "bytes=123456-")]


def test_404_is_a_clear_error_and_nothing_is_cached(site: Site, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"HTTP 404 .*/nothing-here"):
        fetch_verified(site.base + "/nothing-here", "sha256", D1, tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_checksum_mismatch_is_refused_and_nothing_is_kept(site: Site, tmp_path: Path) -> None:
    site.files["/img"] = b"tampered" * 1000
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch_verified(site.base + "/img", "sha256", hashlib.sha256(b"original").hexdigest(), tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_verified_file_is_cached_by_checksum(site: Site, tmp_path: Path) -> None:
    data = b"image" * 1000
    digest = hashlib.sha256(data).hexdigest()
    site.files["/a/img"] = data
    site.files["/b/img"] = data
    first = fetch_verified(site.base + "/a/img", "sha256", digest, tmp_path)
    assert first.downloaded and first.path == tmp_path / f"sha256-{digest}" / "img"
    again = fetch_verified(site.base + "/b/img", "sha256", digest, tmp_path)
    assert not again.downloaded and again.path == first.path and len(site.requests) == 1


# --- the whole path with a real image --------------------------------------------------------------------


def _entry(site: Site, name: str, *, like: str = "debian-12", **changes: object) -> Distro:
    d = distros.get(like)
    src = Source(kind=SourceKind.DOWNLOAD, url=f"{site.base}/images/{name}", checksum_url=f"{site.base}/SHA256SUMS",
                 format=ImageFormat.QCOW2, compression=Compression.ZST)
    return dataclasses.replace(d, id=f"test-{name.split('.')[0]}", source=src, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def vendor_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The debian-12 base image, zstd-compressed like a vendor would publish it, and its sha256."""
    base = ensure_base(distros.get("debian-12"))
    out = tmp_path_factory.mktemp("vendor") / "debian-12-azure.qcow2.zst"
    subprocess.run(["zstd", "-q", "-1", "-T2", str(base.path), "-o", str(out)], check=True)
    h = hashlib.sha256()
    with out.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return out, h.hexdigest()


@pytest.mark.vm
def test_download_path_end_to_end_with_a_dropped_connection(site: Site, tmp_path: Path,
                                                            vendor_image: tuple[Path, str]) -> None:
    path, digest = vendor_image
    site.files["/images/" + path.name] = path
    site.files["/SHA256SUMS"] = f"{'0' * 64}  other.img\n{digest}  {path.name}\n".encode()
    site.drop_once.add("/images/" + path.name)
    conf = {**distros.get("debian-12").waagent_conf, "ResourceDisk.SwapSizeMB": "512", "Logs.Verbose": "y"}
    entry = _entry(site, path.name, waagent_conf=conf, disk_size_mib=32768)
    img = ensure_base(entry, cache=tmp_path)
    assert not img.cached and img.source == "download"
    ranges = [r for p, r in site.requests if p.startswith("/images/")]
    assert ranges[0] == "" and ranges[1].startswith("bytes=")  # dropped, then resumed
    assert (tmp_path / "downloads" / f"sha256-{digest}" / path.name).is_file()
    info = disk.qemu_img_info(img.path)
    assert info["format"] == "qcow2" and info["virtual-size"] == 32768 * disk.MIB
    assert img.packages["waagent"] and img.kernel
    with open_image(img.path, tmp_path) as files:
        got = customize.read_waagent_conf(files.read_text("/etc/waagent.conf"))
        assert got["ResourceDisk.SwapSizeMB"] == "512" and got["Logs.Verbose"] == "y"
        assert got["Provisioning.Agent"] == "waagent"
        assert not [n for n in files.listdir("/etc/ssh") if n.startswith("ssh_host_")]
    # Unchanged inputs: straight from the cache, no new download.
    n = len(site.requests)
    again = ensure_base(entry, cache=tmp_path)
    assert again.cached and again.path == img.path
    assert [p for p, _ in site.requests[n:]] == ["/SHA256SUMS"]


@pytest.mark.vm
def test_corrupted_vendor_image_is_refused_and_nothing_is_cached(site: Site, tmp_path: Path,
                                                                 vendor_image: tuple[Path, str]) -> None:
    path, digest = vendor_image
    bad = tmp_path / "corrupt.qcow2.zst"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    bad.write_bytes(bytes(data))
    site.files["/images/" + path.name] = bad
    site.files["/SHA256SUMS"] = f"{digest}  {path.name}\n".encode()
    cache_root = tmp_path / "cache"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        ensure_base(_entry(site, path.name), cache=cache_root)
    assert not [p for p in (cache_root / "downloads").rglob("*") if p.is_file()]
    assert cache.entries(cache_root / "base", f"test-{path.name.split('.')[0]}") == []


@pytest.mark.vm
def test_404_for_the_image_or_its_checksum_file(site: Site, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        ensure_base(_entry(site, "missing.qcow2.zst"), cache=tmp_path)
    site.files["/SHA256SUMS"] = f"{D1}  missing.qcow2.zst\n".encode()
    with pytest.raises(DownloadError, match=r"HTTP 404 .*missing\.qcow2\.zst"):
        ensure_base(_entry(site, "missing.qcow2.zst"), cache=tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"]


@pytest.mark.vm
def test_agent_missing_from_a_non_apt_image_is_a_clear_error(site: Site, tmp_path: Path,
                                                             vendor_image: tuple[Path, str]) -> None:
    path, digest = vendor_image
    site.files["/images/" + path.name] = path
    site.files["/SHA256SUMS"] = f"{digest}  {path.name}\n".encode()
    entry = _entry(site, path.name, family=Family.RHEL, agent_packages=("hyperv-daemons",))
    with pytest.raises(BuildError, match=r"hyperv-daemons.*not supported here"):
        ensure_base(entry, cache=tmp_path)
    assert cache.entries(tmp_path / "base", entry.id) == []
    assert [p.name for p in (tmp_path / "base" / entry.id).iterdir()] == [".lock"]


@pytest.mark.vm
def test_missing_agent_is_installed_offline_into_a_debian_image(site: Site, tmp_path: Path,
                                                                vendor_image: tuple[Path, str]) -> None:
    """The waagent image turned into a cloud-init one: cloud-init is installed with the image's own apt
    (from the Debian mirror this machine reaches), then configured from the table."""
    path, digest = vendor_image
    site.files["/images/" + path.name] = path
    site.files["/SHA256SUMS"] = f"{digest}  {path.name}\n".encode()
    ci = distros.get("debian-12-cloudinit")
    entry = _entry(site, path.name, like="debian-12-cloudinit", agent_packages=ci.agent_packages)
    img = ensure_base(entry, cache=tmp_path)
    assert "cloud-init" in img.packages
    with open_image(img.path, tmp_path) as files:
        assert '"Azure"' in files.read_text("/etc/cloud/cloud.cfg.d/90_azure_datasource.cfg")
        got = customize.read_waagent_conf(files.read_text("/etc/waagent.conf"))
        assert got["Provisioning.Agent"] == "cloud-init"
        assert files.read_text("/etc/resolv.conf") == ""  # the host's resolver did not stay behind
