"""The scan's worker: runs as ``python -m imagekit.scan.worker`` inside ``unshare --mount`` (a private mount
namespace that dies with it), reads its job as JSON on stdin, mounts each partition read-only, scans, and
writes the findings as JSON on stdout."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from imagekit.core.run import run
from imagekit.scan.image import Partition, fstab_mounts, matches, mount_options
from imagekit.scan.rules import Finding, ScanInput, scan_tree


def main() -> int:
    """Runs inside ``unshare --mount``: mount each partition read-only, put them together as the image's own
    /etc/fstab does (a separate /home or /var/log is scanned where it belongs), scan, unmount."""
    job = json.loads(sys.stdin.read())
    inp = ScanInput(usernames=job["usernames"], hostnames=job["hostnames"], password=job["password"])
    mnt = Path(job["mountpoint"])
    partitions = [Partition(**p) for p in job["partitions"]]
    findings: list[Finding] = []
    mounted: list[Path] = []  # in mount order; unmounted in reverse
    try:
        dirs = []
        for i, p in enumerate(partitions):
            d = mnt / f"p{i}"
            d.mkdir(parents=True, exist_ok=True)
            opts = f"{mount_options(p.fstype)},loop,offset={p.offset},sizelimit={p.size}"
            run(["mount", "-t", p.fstype, "-o", opts, job["image"], d])
            mounted.append(d)
            dirs.append(d)
            if p.fstype.startswith("ext"):
                dev = run(["findmnt", "-n", "-o", "SOURCE", d]).stdout.strip()
                header = run(["dumpe2fs", "-h", dev], check=False).stdout
                if "needs_recovery" in header or re.search(r"Filesystem state:\s+not clean", header):
                    findings.append(Finding("filesystem", "/", f"the filesystem at offset {p.offset} was not "
                                            "cleanly unmounted: the VM did not shut down cleanly"))
        root_index = next((i for i, d in enumerate(dirs)
                           if (d / "etc/fstab").is_file() and not (d / "etc/fstab").is_symlink()), None)
        alone = list(range(len(dirs)))
        if root_index is not None:
            root = dirs[root_index]
            alone.remove(root_index)
            fstab = (root / "etc/fstab").read_text(errors="replace")
            for source, mountpoint in fstab_mounts(fstab):
                target = root / mountpoint.lstrip("/")
                for i in list(alone):
                    # the target must be a real directory inside the image (resolve() would follow the
                    # image's absolute links out to the host)
                    if matches(source, partitions[i]) and target.is_dir() and not target.is_symlink():
                        run(["mount", "--bind", dirs[i], target])
                        mounted.append(target)
                        alone.remove(i)
                        break
            findings += scan_tree(root, inp)
        # Partitions the image's fstab does not mount are scanned as trees of their own.
        for i in alone:
            findings += scan_tree(dirs[i], inp)
    finally:
        for d in reversed(mounted):
            run(["umount", d], check=False)
    json.dump([f.__dict__ for f in findings], sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
