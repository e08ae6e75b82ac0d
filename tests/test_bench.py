"""The capture benchmark runs end to end on a small disk and refuses sizes it cannot honour."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagekit.bench import capture_benchmark, render, run_capture_benchmark
from imagekit.core.errors import InputError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the offline scan step mounts loop devices (root)")


def test_small_run_gives_every_row_with_its_ratio(tmp_path: Path) -> None:
    rows = run_capture_benchmark(tmp_path, disk_gib=1, data_mib=16, repeat=1)
    names = [r.name for r in rows]
    assert names[0].startswith("sparse copy") and names[-1].startswith("whole capture")
    assert all(r.seconds > 0 for r in rows)
    assert all(r.ratio is not None for r in rows[1:]), "every step after the floor is a ratio to a baseline"
    table = render(rows)
    assert table.count("\n") == len(rows) and "× baseline" in table
    assert list(tmp_path.iterdir()) == [], "the benchmark's scratch directory must be removed"


@pytest.mark.parametrize(("disk_gib", "data_mib", "repeat"), [(0, 16, 1), (1, 4, 1), (1, 600, 1), (1, 16, 0)])
def test_bad_sizes_are_refused_before_any_work(tmp_path: Path, disk_gib: int, data_mib: int, repeat: int) -> None:
    with pytest.raises(InputError) as err:
        capture_benchmark(tmp_path, disk_gib=disk_gib, data_mib=data_mib, repeat=repeat)
    assert str(repeat) in str(err.value) or f"{disk_gib} GiB" in str(err.value)
    assert list(tmp_path.iterdir()) == []
