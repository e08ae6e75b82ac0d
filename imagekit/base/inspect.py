"""Read an image's root file system offline, without mounting it.

``with open_image(qcow2) as img: img.read_text("/etc/waagent.conf")``: the image is converted to a
sparse raw file in a temp directory (only its data is written), and files are read with ``debugfs``
at the root partition's byte offset. Nothing is mounted; the temp file is removed on exit.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imagekit.base import disk
from imagekit.core.errors import BuildError
from imagekit.core.run import run


@dataclass
class ImageFiles:
    raw: Path
    partition: disk.Partition
    partitions: list[disk.Partition]

    def _fs(self) -> str:
        return f"{self.raw}?offset={self.partition.offset}"

    def _debugfs(self, request: str) -> tuple[str, str]:
        res = run(["debugfs", "-R", request, self._fs()], check=False)
        err = "\n".join(line for line in res.stderr.splitlines() if not line.startswith("debugfs "))
        return res.stdout, err

    def read_text(self, path: str) -> str:
        out, err = self._debugfs(f"cat {path}")
        if err.strip():
            raise FileNotFoundError(f"{path} in {self.raw}: {err.strip()}")
        return out

    def exists(self, path: str) -> bool:
        _, err = self._debugfs(f"stat {path}")
        return not err.strip()

    def listdir(self, path: str) -> list[str]:
        out, err = self._debugfs(f"ls -p {path}")
        if err.strip():
            raise FileNotFoundError(f"{path} in {self.raw}: {err.strip()}")
        names = []
        for line in out.splitlines():
            # /inode/mode/uid/gid/name/size/
            parts = line.split("/")
            if len(parts) >= 6 and parts[5] not in (".", "..", ""):
                names.append(parts[5])
        return names

    def features(self) -> set[str]:
        out, _ = self._debugfs("features")
        return set(out.split(":", 1)[-1].split())


@contextlib.contextmanager
def open_image(image: Path, workdir: Path | None = None) -> Iterator[ImageFiles]:
    """Yield an :class:`ImageFiles` for the first Linux partition of ``image`` (qcow2 or raw)."""
    tmp = Path(tempfile.mkdtemp(prefix="imagekit-inspect-", dir=workdir))
    try:
        raw = tmp / "disk.raw"
        run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)])
        parts = disk.partitions(raw)
        linux = [p for p in parts if p.type in ("83", "0fc63daf-8483-4772-8e79-3d69d8477de4")]
        if not linux:
            raise BuildError(f"{image}: no Linux partition found (partitions: {parts})")
        yield ImageFiles(raw, linux[0], parts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
