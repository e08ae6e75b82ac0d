"""The resource disk as Azure delivers it, read back with the host's own tools (sfdisk, blkid, ntfs-3g)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from imagekit.core.errors import CommandError, InputError
from imagekit.media import resource_disk as resourcedisk
from imagekit.media.resource_disk import README_NAME, README_TEXT, create_resource_disk

MIB = 1024 * 1024


def _out(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_resource_disk(tmp_path_factory.mktemp("rd") / "resource.raw", 256)


def test_mbr_with_one_ntfs_partition(disk: Path) -> None:
    table = json.loads(_out("sfdisk", "--json", disk))["partitiontable"]
    assert table["label"] == "dos"
    (part,) = table["partitions"]
    assert part["type"] == "7"
    assert part["start"] == 2048
    assert (part["start"] + part["size"]) * 512 == 256 * MIB
    assert disk.stat().st_size == 256 * MIB


def test_partition_holds_ntfs_with_only_the_readme(disk: Path, tmp_path: Path) -> None:
    probe = _out("blkid", "-p", "-O", str(2048 * 512), "-o", "export", disk)
    fields = dict(line.split("=", 1) for line in probe.splitlines() if "=" in line)
    assert fields["TYPE"] == "ntfs"
    assert fields["LABEL"].replace("\\ ", " ") == "Temporary Storage"  # export format escapes spaces
    part = tmp_path / "part.ntfs"
    subprocess.run(["dd", f"if={disk}", f"of={part}", "bs=1M", "skip=1", "conv=sparse", "status=none"], check=True)
    listing = _out("ntfsls", part).split()
    assert listing == [README_NAME]
    raw = subprocess.run(["ntfscat", part, README_NAME], check=True, capture_output=True).stdout
    assert raw == README_TEXT.encode()
    info = _out("ntfsinfo", "-m", part)
    assert "Volume Name: Temporary Storage" in info


def test_disk_is_sparse(disk: Path) -> None:
    st = disk.stat()
    assert st.st_blocks * 512 < st.st_size // 10, "the resource disk should stay sparse on the host"


def test_bad_size_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="resource disk size 1 MiB"):
        create_resource_disk(tmp_path / "r.raw", 1)
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = resourcedisk.run  # type: ignore[attr-defined]

    def failing(argv: list[str], **kw: object) -> object:
        if str(argv[0]) == "ntfscp":
            raise CommandError([str(a) for a in argv], 1, "", "simulated failure")
        return real_run(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(resourcedisk, "run", failing)
    with pytest.raises(CommandError, match="simulated failure"):
        create_resource_disk(tmp_path / "r.raw", 64)
    assert list(tmp_path.iterdir()) == []
