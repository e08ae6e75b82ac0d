"""Upload throughput of ``invoke publish`` against Azurite on this machine (not collected by pytest).

    .venv/bin/python -m tests.bench_publish [--disk-gib 30] [--data-mib 512] [--full-mib 1024]

A sparse raw disk of --disk-gib with --data-mib of random data in 8 MiB pieces spread over it is captured as a
fixed VHD (imagekit's capture code) and registered in a throwaway gallery; then it is published --blob-only to
a fresh Azurite. Reported: bytes sent / data bytes, the upload's time against the time to read those data
bytes locally, the verification's time, and a non-sparse upload of the whole file estimated from a measured
upload of --full-mib of every page (zeros included) — sending 30 GiB to Azurite for real would take long and
fill the disk it runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from imagekit.gallery import Gallery
from imagekit.publish import PublishOptions, blob, pages, prepare, publish
from tests import azurite
from tests.test_publish import register

MiB = 1024 * 1024


def _read_ranges(path: Path, ranges: tuple[pages.Range, ...]) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # from the disk, as the upload's first read is
        t = time.monotonic()
        for r in ranges:
            os.pread(fd, r.length, r.start)
        return time.monotonic() - t
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--disk-gib", type=int, default=30)
    ap.add_argument("--data-mib", type=int, default=512)
    ap.add_argument("--full-mib", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=blob.DEFAULT_WORKERS)
    args = ap.parse_args()
    out: dict[str, Any] = {"disk_gib": args.disk_gib, "data_mib": args.data_mib, "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="bench-publish-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        raw = root / "disk.raw"
        rnd = random.Random(1)
        size = args.disk_gib * 1024 * MiB
        pieces = args.data_mib // 8
        with raw.open("wb") as f:
            f.truncate(size)
            for i in range(pieces):
                f.seek((size // pieces) * i)
                f.write(rnd.randbytes(8 * MiB))
        g = Gallery(root / "images")
        t = time.monotonic()
        register(g, raw, "12.0.1")
        out["capture_and_register_s"] = round(time.monotonic() - t, 2)
        raw.unlink()
        with azurite.running(root / "azurite") as az:
            os.environ["AZURE_STORAGE_CONNECTION_STRING"] = az.connection_string
            t = time.monotonic()
            p = prepare(PublishOptions(distro="debian-12", version="12.0.1", container="vhds", blob_only=True,
                                       workers=args.workers), g)
            out["prepare_s"] = round(time.monotonic() - t, 2)  # the manifest's SHA-256 again, and the plan
            out["file_bytes"] = p.plan.size
            out["extent_bytes"] = p.plan.extent_bytes
            out["data_bytes"] = p.plan.data_bytes
            out["requests"] = len(p.plan.ranges)
            out["local_read_of_data_s"] = round(_read_ranges(p.source.vhd, p.plan.ranges), 3)
            timings: dict[str, float] = {}
            real_verify = blob._verify

            def timed_verify(*a: Any, **kw: Any) -> None:
                s = time.monotonic()
                real_verify(*a, **kw)
                timings["verify"] = time.monotonic() - s

            blob._verify = timed_verify  # type: ignore[assignment]
            t = time.monotonic()
            res = publish(p, gallery=g)
            total = time.monotonic() - t
            blob._verify = real_verify  # type: ignore[assignment]
            out["sent_bytes"] = res.upload.sent_bytes
            out["sent_per_data"] = round(res.upload.sent_bytes / p.plan.data_bytes, 4)
            out["upload_s"] = round(total - timings["verify"], 2)
            out["verify_s"] = round(timings["verify"], 2)
            out["upload_MiB_per_s"] = round(res.upload.sent_bytes / MiB / out["upload_s"], 1)
            out["upload_per_local_read"] = round(out["upload_s"] / max(out["local_read_of_data_s"], 1e-3), 1)
            # A non-sparse upload: every page of --full-mib sent (zeros too), measured, then scaled to the file.
            full = root / "full.raw"
            with full.open("wb") as f:
                f.truncate(args.full_mib * MiB)
            storage = blob.connect("")
            dense = pages.Plan(size=args.full_mib * MiB, extent_bytes=args.full_mib * MiB,
                               ranges=tuple(pages.split([(0, args.full_mib * MiB)])))
            svc = storage.service.get_blob_client("vhds", "dense.vhd")
            svc.create_page_blob(args.full_mib * MiB)
            t = time.monotonic()
            blob._send(svc, full, list(dense.ranges), args.workers)
            dense_s = time.monotonic() - t
            out["dense_measured_MiB"] = args.full_mib
            out["dense_measured_s"] = round(dense_s, 2)
            out["dense_MiB_per_s"] = round(args.full_mib / dense_s, 1)
            out["dense_whole_file_estimate_s"] = round(p.plan.size / MiB / (args.full_mib / dense_s), 0)
            out["sparse_vs_dense_estimate"] = round(out["dense_whole_file_estimate_s"] / out["upload_s"], 1)
            # publishing again: nothing sent
            t = time.monotonic()
            again = publish(prepare(PublishOptions(distro="debian-12", version="12.0.1", container="vhds",
                                                   blob_only=True), g), gallery=g)
            out["again_s_with_prepare"] = round(time.monotonic() - t, 2)
            out["again_sent_bytes"] = again.upload.sent_bytes
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
