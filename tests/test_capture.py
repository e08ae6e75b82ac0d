"""Capture: fixed VHD footer read back by our own parser, zstd qcow2, sparse hashing, size rounding."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from pathlib import Path

import pytest

from imagekit import capture
from imagekit.capture import VHD_FOOTER_SIZE, MiB
from imagekit.core.errors import BuildError
from imagekit.core.run import which

pytestmark = pytest.mark.skipif(which("qemu-img") is None, reason="qemu-img is not installed")


def _qemu_io(path: Path, fmt: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def _disk(tmp: Path, size: str, fmt: str = "qcow2") -> Path:
    p = tmp / f"src.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(p), size], check=True)
    _qemu_io(p, fmt, "write -P 0xab 0 1M", "write -P 0x5c 7M 512k")
    return p


def test_footer_parse_and_checksum_roundtrip(tmp_path: Path) -> None:
    src = _disk(tmp_path, "64M")
    vhd = tmp_path / "d.vhd"
    assert capture.make_fixed_vhd(src, vhd) == 64 * MiB
    footer = capture.verify_azure_vhd(vhd, expected_size=64 * MiB)
    assert footer.cookie == b"conectix"
    assert footer.disk_type_name == "fixed"
    assert footer.current_size == 64 * MiB
    assert footer.checksum == footer.computed_checksum
    assert vhd.stat().st_size == 64 * MiB + VHD_FOOTER_SIZE
    # the data really is the source's, read as a raw prefix of the file
    with vhd.open("rb") as fh:
        assert fh.read(MiB) == b"\xab" * MiB
        fh.seek(7 * MiB)
        assert fh.read(512 * 1024) == b"\x5c" * (512 * 1024)


def _corrupt(vhd: Path, offset_in_footer: int, data: bytes, fix_checksum: bool) -> None:
    with vhd.open("r+b") as fh:
        fh.seek(-VHD_FOOTER_SIZE, os.SEEK_END)
        raw = bytearray(fh.read(VHD_FOOTER_SIZE))
        raw[offset_in_footer:offset_in_footer + len(data)] = data
        if fix_checksum:
            raw[64:68] = struct.pack(">I", capture.vhd_checksum(bytes(raw)))
        fh.seek(-VHD_FOOTER_SIZE, os.SEEK_END)
        fh.write(raw)


@pytest.mark.parametrize(
    ("offset", "data", "fix", "message"),
    [
        (0, b"notavhd!", True, "cookie"),
        (60, struct.pack(">I", 3), True, "disk type is dynamic"),
        (48, struct.pack(">Q", 64 * MiB + 512), True, "not a whole number of MiB"),
        (48, struct.pack(">Q", 63 * MiB), True, "plus the 512-byte footer"),
        (60, struct.pack(">I", 3), False, "checksum"),
    ],
)
def test_bad_footers_are_rejected(tmp_path: Path, offset: int, data: bytes, fix: bool, message: str) -> None:
    src = _disk(tmp_path, "64M")
    vhd = tmp_path / "d.vhd"
    capture.make_fixed_vhd(src, vhd)
    _corrupt(vhd, offset, data, fix)
    with pytest.raises(BuildError, match=message):
        capture.verify_azure_vhd(vhd)


def test_dynamic_vhd_from_converter_is_caught(tmp_path: Path) -> None:
    """What many tools get wrong (image-standards.md §2): a dynamic VHD must not pass."""
    src = _disk(tmp_path, "64M")
    vhd = tmp_path / "dyn.vhd"
    subprocess.run(["qemu-img", "convert", "-O", "vpc", str(src), str(vhd)], check=True)
    with pytest.raises(BuildError, match="dynamic"):
        capture.verify_azure_vhd(vhd)


def test_short_file_is_rejected(tmp_path: Path) -> None:
    p = tmp_path / "tiny.vhd"
    p.write_bytes(b"x" * 100)
    with pytest.raises(BuildError, match="too short"):
        capture.read_vhd_footer(p)


def test_unaligned_source_is_rounded_up_and_left_untouched(tmp_path: Path) -> None:
    src = tmp_path / "odd.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(src), str(64 * MiB + 4096)], check=True)
    _qemu_io(src, "raw", "write -P 0x11 0 4k", f"write -P 0x22 {64 * MiB} 4k")
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    vhd = tmp_path / "odd.vhd"
    size = capture.make_fixed_vhd(src, vhd)
    assert size == 65 * MiB
    capture.verify_azure_vhd(vhd, expected_size=65 * MiB)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert src.stat().st_size == 64 * MiB + 4096
    with vhd.open("rb") as fh:
        fh.seek(64 * MiB)
        assert fh.read(4096) == b"\x22" * 4096
        assert fh.read(MiB - 4096) == bytes(MiB - 4096)  # the added tail reads as zeros
    assert not any(p.name.startswith(".vhd-") for p in tmp_path.iterdir())  # temp overlay gone


def test_sparse_sha256_matches_hashlib(tmp_path: Path) -> None:
    p = tmp_path / "sparse"
    with p.open("wb") as fh:
        fh.seek(3 * MiB + 17)
        fh.write(b"data in the middle")
        fh.seek(9 * MiB)
        fh.write(b"end")
        fh.truncate(12 * MiB + 5)
    assert capture.sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert capture.sha256_file(empty) == hashlib.sha256(b"").hexdigest()
    hole = tmp_path / "hole"
    hole.touch()
    os.truncate(hole, 5 * MiB)
    assert capture.sha256_file(hole) == hashlib.sha256(bytes(5 * MiB)).hexdigest()


def _sparse_capture(tmp_path: Path, gib: int) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), f"{gib}G"], check=True)
    _qemu_io(base, "qcow2", "write -P 0x01 0 8M")
    overlay = tmp_path / "overlay.qcow2"  # like the VM's disk: an overlay over the base
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)],
                   check=True)
    _qemu_io(overlay, "qcow2", f"write -P 0x02 {gib - 1}G 8M")
    out = tmp_path / "out"
    seen: list[Path] = []
    arts = capture.capture(overlay, out, vhd_ready=seen.append)
    assert seen == [out / "disk.vhd"]
    by_name = {a.name: a for a in arts}
    vhd, q = by_name["disk.vhd"], by_name["disk.qcow2"]
    assert vhd.format == "vhd-fixed" and vhd.virtual_size == gib * 1024 * MiB
    assert vhd.size == gib * 1024 * MiB + 512
    assert vhd.allocated < 64 * MiB  # sparse: holds the data, not 30 GiB
    assert q.allocated < 16 * MiB
    assert capture.image_info(out / "disk.qcow2", "qcow2").get("backing-filename") is None
    assert q.sha256 == hashlib.sha256((out / "disk.qcow2").read_bytes()).hexdigest()
    capture.verify_artifacts(out, [a.as_dict() for a in arts])
    # a changed byte is caught
    with (out / "disk.qcow2").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff")
    with pytest.raises(BuildError, match="sha256"):
        capture.verify_artifacts(out, [a.as_dict() for a in arts])


def test_capture_sparse_disk(tmp_path: Path) -> None:
    """Sparse artifacts, correct hashes, a zstd qcow2 without backing file, from an overlay."""
    _sparse_capture(tmp_path, 2)


@pytest.mark.vm
def test_capture_30gib_sparse_disk(tmp_path: Path) -> None:
    """The Azure default size: a 30 GiB disk with little data stays small on the host."""
    _sparse_capture(tmp_path, 30)


def test_capture_refuses_to_overwrite(tmp_path: Path) -> None:
    src = _disk(tmp_path, "64M")
    out = tmp_path / "out"
    out.mkdir()
    (out / "disk.vhd").write_bytes(b"precious")
    with pytest.raises(BuildError, match="never overwrites"):
        capture.capture(src, out)
    assert (out / "disk.vhd").read_bytes() == b"precious"


def test_failing_capture_cancels_the_hash_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leak found in the VHD stops the capture without finishing a full hash of a big disk."""
    import threading

    outcomes: list[str] = []
    real = capture.sha256_file
    started = threading.Event()

    def recording(path: Path, cancel: threading.Event | None = None) -> str:
        started.set()
        try:
            digest = real(path, cancel)
        except capture.Cancelled:
            outcomes.append("cancelled")
            raise
        outcomes.append("finished")
        return digest

    monkeypatch.setattr(capture, "sha256_file", recording)
    src = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "30G"], check=True)
    out = tmp_path / "out"

    def reject(vhd: Path) -> None:
        started.wait(10)
        raise BuildError("leak found")

    with pytest.raises(BuildError, match="leak found"):
        capture.capture(src, out, vhd_ready=reject)
    assert outcomes == ["cancelled"]
    assert list(out.iterdir()) == []


def test_sha256_cancel(tmp_path: Path) -> None:
    import threading

    p = tmp_path / "f"
    p.write_bytes(b"x")
    ev = threading.Event()
    ev.set()
    with pytest.raises(capture.Cancelled):
        capture.sha256_file(p, ev)


def test_pending_capture_hashes_beside_the_callers_work_and_abort_removes_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """start_capture returns with both artifacts written while their SHA-256 still runs: the build boots the
    verify VM meanwhile. finish() waits and gives hashlib's digests; abort() stops the hash, removes both."""
    import threading

    real = capture.sha256_file
    release = threading.Event()
    hashed: list[str] = []

    def gated(path: Path, cancel: threading.Event | None = None) -> str:
        release.wait(30)  # held until the caller's own work is done: proves start_capture did not wait
        hashed.append(path.name)
        return real(path, cancel)

    monkeypatch.setattr(capture, "sha256_file", gated)
    src = _disk(tmp_path, "64M")
    out = tmp_path / "out"
    pending = capture.start_capture(src, out)
    assert hashed == [] and (out / "disk.vhd").exists() and (out / "disk.qcow2").exists()
    release.set()
    arts = pending.finish()
    assert hashed == ["disk.vhd", "disk.qcow2"]
    for a in arts:
        assert a.sha256 == hashlib.sha256((out / a.name).read_bytes()).hexdigest()

    release.clear()
    hashed.clear()
    out2 = tmp_path / "out2"
    pending = capture.start_capture(src, out2)
    threads = threading.active_count()
    release.set()
    pending.abort()
    assert list(out2.iterdir()) == []
    assert threading.active_count() < threads  # the hashing thread is gone, not left running
    pending.abort()  # twice is harmless
