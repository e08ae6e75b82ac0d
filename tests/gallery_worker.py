"""Registers, deprecates and removes versions in a loop; tests kill it at random moments (SIGKILL)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import sys
from pathlib import Path

from imagekit.gallery import Gallery


def main() -> None:
    root, rounds = Path(sys.argv[1]), int(sys.argv[2])
    g = Gallery(root)
    for i in range(rounds):
        with g.staging() as st:
            arts = []
            for name, size in (("disk.vhd", 3 << 20), ("disk.qcow2", 1 << 20)):
                data = os.urandom(size)
                with (st.path / name).open("wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                arts.append({"name": name, "size": size, "sha256": hashlib.sha256(data).hexdigest()})
            iv = g.register("debian-12", st, {"artifacts": arts}, distro_version="12")
        print(f"registered {iv.version}", flush=True)
        if i % 3 == 1:
            g.deprecate("debian-12", iv.version, dt.date(2030, 1, 1))
        if i % 4 == 3:
            g.remove("debian-12", iv.version)


if __name__ == "__main__":
    main()
