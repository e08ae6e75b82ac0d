"""The local gallery: register, list, latest as Azure resolves it, deprecate, remove, and crash safety."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagekit.capture import verify_artifacts
from imagekit.errors import InputError
from imagekit.gallery import Gallery, Status
from imagekit.versions import Version

TODAY = dt.date(2026, 11, 22)


def _register(g: Gallery, version: str | None, distro: str = "debian-12", payload: bytes = b"disk") -> str:
    with g.staging() as st:
        (st.path / "disk.vhd").write_bytes(payload)
        arts = [{"name": "disk.vhd", "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}]
        iv = g.register(distro, st, {"artifacts": arts, "kernel": "6.1"},
                        Version.parse(version) if version else None, distro_version="12")
    return str(iv.version)


def test_register_list_latest_first(tmp_path: Path) -> None:
    g = Gallery(tmp_path)
    for v in ["12.0.5", "12.0.10", "12.1.0", "12.0.9"]:
        _register(g, v)
    _register(g, "1.0.0", distro="debian-12-cloudinit")
    assert [str(v.version) for v in g.versions("debian-12")] == ["12.1.0", "12.0.10", "12.0.9", "12.0.5"]
    assert {v.distro for v in g.versions()} == {"debian-12", "debian-12-cloudinit"}
    iv = g.get("debian-12", "12.0.10")
    m = iv.manifest()
    assert m["version"] == "12.0.10" and m["distro"] == "debian-12" and m["kernel"] == "6.1"
    assert (tmp_path / "debian-12" / "12.0.10" / "disk.vhd").read_bytes() == b"disk"
    index = json.loads((tmp_path / "index.json").read_text())
    assert set(index["distros"]["debian-12"]) == {"12.0.5", "12.0.10", "12.1.0", "12.0.9"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging-")]
    for f in ("manifest.json", "disk.vhd"):
        assert ((tmp_path / "debian-12" / "12.0.10" / f).stat().st_mode & 0o777) == 0o444
    assert ((tmp_path / "index.json").stat().st_mode & 0o777) == 0o644


def test_default_versions_do_not_collide(tmp_path: Path) -> None:
    g = Gallery(tmp_path)
    a, b = _register(g, None), _register(g, None)
    assert a != b and Version.parse(b) > Version.parse(a)
    assert a.startswith("12.0.") and len(a.split(".")[2]) == 10


def test_registered_version_is_immutable(tmp_path: Path) -> None:
    g = Gallery(tmp_path)
    _register(g, "12.0.1", payload=b"first")
    with pytest.raises(InputError, match="immutable"):
        _register(g, "12.0.1", payload=b"second")
    assert (tmp_path / "debian-12" / "12.0.1" / "disk.vhd").read_bytes() == b"first"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging-")]  # refused staging cleaned
    g.remove("debian-12", "12.0.1")
    with pytest.raises(InputError, match="never reused"):
        _register(g, "12.0.1")
    with pytest.raises(InputError, match="never reused"):
        g.reserve_check("debian-12", Version(12, 0, 1))


def test_latest_skips_deprecated_and_end_of_life(tmp_path: Path) -> None:
    g = Gallery(tmp_path)
    for v in ["12.0.1", "12.0.2", "12.0.3"]:
        _register(g, v)
    assert str(g.latest("debian-12", TODAY).version) == "12.0.3"
    g.deprecate("debian-12", "12.0.3", dt.date(2027, 1, 1), today=TODAY)
    assert g.get("debian-12", "12.0.3").status(TODAY) is Status.DEPRECATED
    assert str(g.latest("debian-12", TODAY).version) == "12.0.2"
    # an end-of-life date that has passed also takes a version out of latest, even if not excluded
    g.deprecate("debian-12", "12.0.2", dt.date(2026, 1, 1), exclude_from_latest=False, today=dt.date(2025, 12, 1))
    assert g.get("debian-12", "12.0.2").status(TODAY) is Status.END_OF_LIFE
    assert str(g.latest("debian-12", TODAY).version) == "12.0.1"
    g.remove("debian-12", "12.0.1")
    with pytest.raises(InputError, match="deprecated or past end of life"):
        g.latest("debian-12", TODAY)
    with pytest.raises(InputError, match="no image versions"):
        g.latest("debian-13", TODAY)


def test_remove(tmp_path: Path) -> None:
    g = Gallery(tmp_path)
    _register(g, "12.0.1")
    _register(g, "12.0.2")
    g.remove("debian-12", "12.0.2")
    assert not (tmp_path / "debian-12" / "12.0.2").exists()
    assert [str(v.version) for v in g.versions("debian-12")] == ["12.0.1"]
    removed = [v for v in g.versions("debian-12", include_removed=True) if v.removed_at]
    assert [str(v.version) for v in removed] == ["12.0.2"]
    with pytest.raises(InputError, match=r"no image version 12\.0\.2"):
        g.remove("debian-12", "12.0.2")
    g.remove("debian-12", "12.0.1")
    assert not (tmp_path / "debian-12").exists()


def test_bad_input(tmp_path: Path) -> None:
    g = Gallery(tmp_path)
    with pytest.raises(InputError, match="bad distro id"):
        g.versions("../etc")
    with pytest.raises(InputError, match=r"Major\.Minor\.Patch"):
        g.get("debian-12", "latest")


def test_reconciles_a_crash_between_rename_and_index(tmp_path: Path) -> None:
    g = Gallery(tmp_path)
    _register(g, "12.0.1")
    index_before = (tmp_path / "index.json").read_text()
    _register(g, "12.0.2")
    (tmp_path / "index.json").write_text(index_before)  # as if killed right after the rename
    assert [str(v.version) for v in g.versions("debian-12")] == ["12.0.2", "12.0.1"]
    with pytest.raises(InputError, match="immutable"):
        _register(g, "12.0.2")


def test_dead_builds_staging_is_collected_live_one_kept(tmp_path: Path) -> None:
    g = Gallery(tmp_path)
    dead = tmp_path / ".staging-999999-dead"
    dead.mkdir()
    (dead / "disk.vhd").write_bytes(b"half")
    (dead / ".owner.lock").touch()  # nobody holds its flock: its build is gone
    with g.staging() as live:
        (live.path / "disk.vhd").write_bytes(b"in progress")
        _register(g, "12.0.1")  # any write collects garbage
        assert not dead.exists()
        assert (live.path / "disk.vhd").read_bytes() == b"in progress"
    assert not live.path.exists()


def _check_invariant(root: Path) -> list[str]:
    """Every listed version is complete and matches its manifest; no version directory is half-made."""
    json.loads((root / "index.json").read_text()) if (root / "index.json").exists() else None
    g = Gallery(root)
    listed = g.versions("debian-12")
    for iv in listed:
        m = iv.manifest()
        assert m["version"] == str(iv.version)
        verify_artifacts(iv.path, m["artifacts"])
    on_disk = sorted(p.name for p in (root / "debian-12").iterdir()) if (root / "debian-12").exists() else []
    assert on_disk == sorted(str(iv.version) for iv in listed), (on_disk, listed)
    return on_disk


def test_sigkill_at_random_points_leaves_none_or_complete(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("gallery_worker.py")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    seed = int(os.environ.get("GALLERY_KILL_SEED", time.time()))
    rng = random.Random(seed)
    start = time.monotonic()  # one undisturbed run sets the window the kills fall in
    subprocess.run([sys.executable, str(worker), str(tmp_path / "calibrate"), "8"], env=env, check=True,
                   capture_output=True)
    window = time.monotonic() - start
    kills = 0
    for trial in range(14):
        root = tmp_path / f"g{trial}"
        proc = subprocess.Popen([sys.executable, str(worker), str(root), "8"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.0, window * 0.9))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _out, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()
        _check_invariant(root)
        # the next registration cleans up the leftovers and still works
        g = Gallery(root)
        _register(g, None)
        assert not [p for p in root.iterdir() if p.name.startswith((".staging-", ".trash-"))]
        _check_invariant(root)
    assert kills >= 5, f"seed {seed}: only {kills} runs were killed; the timing window needs widening"


def test_ctrl_c_during_a_build_leaves_no_version(tmp_path: Path) -> None:
    g = Gallery(tmp_path)
    with pytest.raises(KeyboardInterrupt), g.staging() as st:
        (st.path / "disk.vhd").write_bytes(b"half written")
        raise KeyboardInterrupt
    assert not st.path.exists()
    assert g.versions() == []


def test_tasks_list_latest_deprecate_remove(tmp_path: Path) -> None:
    """The Invoke tasks, run as a user runs them (a subprocess), against a gallery in a temp dir."""
    g = Gallery(tmp_path)
    for v in ["12.0.1", "12.0.2"]:
        _register(g, v)
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, IMAGEKIT_IMAGES=str(tmp_path))

    def inv(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(repo / ".venv/bin/invoke"), *args], cwd=repo, env=env, capture_output=True,
                              text=True)

    out = inv("images").stdout
    assert out.index("12.0.2") < out.index("12.0.1") and "active" in out
    assert inv("images", "--distro", "debian-12", "--latest").stdout.startswith("debian-12 12.0.2")
    res = inv("images-deprecate", "--distro", "debian-12", "--version", "12.0.2", "--end-of-life", "2099-01-01")
    assert res.returncode == 0 and "deprecated" in res.stdout, res.stderr
    assert inv("images", "--distro", "debian-12", "--latest").stdout.startswith("debian-12 12.0.1")
    bad = inv("images-deprecate", "--distro", "debian-12", "--version", "12.0.2", "--end-of-life", "soon")
    assert bad.returncode == 1 and "YYYY-MM-DD" in bad.stderr
    assert inv("images-remove", "--distro", "debian-12", "--version", "12.0.1").returncode == 0
    listing = json.loads(inv("images", "--all", "--json").stdout)
    assert {(v["version"], v["status"]) for v in listing} == {("12.0.2", "deprecated"), ("12.0.1", "removed")}
    missing = inv("images", "--distro", "debian-12", "--latest")
    assert missing.returncode == 1 and "deprecated or past end of life" in missing.stderr
