"""The local gallery: register, list, latest as Azure resolves it, deprecate, remove, and crash safety."""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import io
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
from imagekit.core.errors import ImagekitError, InputError
from imagekit.core.versions import Version
from imagekit.gallery import Gallery, Status

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


# --- deterministic crash safety: fail or kill at each filesystem operation -----------------------------------

# Every call that touches the file system on the way to a published version (or a deprecation or removal):
# opens (also those mkstemp and fsync_dir make), directory and file creation and removal, renames, mode
# changes, fsyncs, flocks. Path methods and shutil end in these os functions.
_FS_OPS = ("open", "mkdir", "rename", "replace", "unlink", "rmdir", "chmod", "fchmod", "fsync", "link", "symlink",
           "truncate", "ftruncate", "remove", "scandir", "listdir", "stat", "lstat", "utime", "sendfile",
           "copy_file_range")


class _Injected(OSError):
    pass


class _FaultAt:
    """Count the file-system calls made inside ``with``; at call ``n`` (1-based) fail it or SIGKILL the process."""

    def __init__(self, n: int, kill: bool = False) -> None:
        self.n, self.kill, self.calls, self.hit = n, kill, 0, ""
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, owner: object, name: str) -> None:
        real = getattr(owner, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            self.calls += 1
            if self.calls == self.n:
                self.hit = f"{name}{args!r}"[:300]
                if self.kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise _Injected(5, f"injected failure at call {self.n}: {self.hit}")
            return real(*args, **kwargs)

        self._saved.append((owner, name, real))
        setattr(owner, name, wrapper)

    def __enter__(self) -> _FaultAt:
        import fcntl

        for name in _FS_OPS:
            if hasattr(os, name):
                self._wrap(os, name)
        self._wrap(fcntl, "flock")
        self._wrap(io, "open")  # pathlib's read_text/write_bytes/open
        self._wrap(builtins, "open")  # shutil's copies, json files opened by name
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)


def _staged(g: Gallery, st: object) -> list[dict[str, object]]:
    arts = []
    for name, payload in (("disk.vhd", b"vhd" * 1000), ("disk.qcow2", b"qcow2" * 500)):
        (st.path / name).write_bytes(payload)  # type: ignore[attr-defined]
        arts.append({"name": name, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})
    return arts


def _prepare(root: Path) -> Gallery:
    g = Gallery(root)
    _register(g, "12.0.1")
    _register(g, "12.0.2")
    return g


def _operation(g: Gallery, op: str, fault: _FaultAt) -> None:
    if op == "register":
        with g.staging() as st:
            arts = _staged(g, st)
            with fault:
                g.register("debian-12", st, {"artifacts": arts}, Version(12, 0, 3))
    elif op == "deprecate":
        with fault:
            g.deprecate("debian-12", "12.0.2", dt.date(2099, 1, 1))
    else:
        with fault:
            g.remove("debian-12", "12.0.2")


def _check_after(root: Path, op: str) -> str:
    """The gallery after a failure or a kill: a readable index, complete versions only, and the operation
    either fully done or not at all. Returns which of the two it was."""
    if (root / "index.json").exists():
        json.loads((root / "index.json").read_text())  # always parses
    on_disk = _check_invariant(root)
    g = Gallery(root)
    listed = {str(v.version): v for v in g.versions("debian-12", include_removed=True)}
    assert {"12.0.1", "12.0.2"} <= set(listed)
    if op == "register":
        state = "done" if "12.0.3" in on_disk else "not done"
        assert ("12.0.3" in listed) == (state == "done")
    elif op == "deprecate":
        eol = listed["12.0.2"].end_of_life
        assert eol in (None, dt.date(2099, 1, 1))
        assert listed["12.0.2"].exclude_from_latest == (eol is not None)  # both fields or neither
        state = "done" if eol else "not done"
    else:
        removed = listed["12.0.2"].removed_at is not None
        assert removed == ("12.0.2" not in on_disk)
        state = "done" if removed else "not done"
    # the next write cleans up what was left, and works
    _register(g, "12.0.9")
    assert not [p.name for p in root.iterdir() if p.name.startswith((".staging-", ".trash-"))]
    _check_invariant(root)
    return state


@pytest.mark.parametrize("op", ["register", "deprecate", "remove"])
def test_a_failure_at_each_filesystem_operation_leaves_none_or_complete(tmp_path: Path, op: str) -> None:
    outcomes: list[str] = []
    for n in range(1, 500):
        root = tmp_path / f"{op}-{n}"
        g = _prepare(root)
        fault = _FaultAt(n)
        try:
            _operation(g, op, fault)
        except _Injected:
            pass
        except (OSError, ImagekitError) as exc:  # a failure the operation turned into its own error
            assert "injected failure" in str(exc) or fault.hit, exc
        if not fault.hit:  # the operation made fewer than n calls: every point has been tried
            assert _check_after(root, op) == "done"
            break
        outcomes.append(f"{n} {fault.hit[:60]}: {_check_after(root, op)}")
    else:
        pytest.fail("the operation never completed")
    assert len(outcomes) >= (8 if op == "register" else 4), outcomes
    if op == "register":
        assert any("rename" in o for o in outcomes) and any("replace" in o for o in outcomes), outcomes


@pytest.mark.parametrize("op", ["register", "deprecate", "remove"])
def test_a_sigkill_at_each_filesystem_operation_leaves_none_or_complete(tmp_path: Path, op: str) -> None:
    """The same points, but the process dies there (SIGKILL in a forked child): nothing in-process cleans up."""
    killed = 0
    for n in range(1, 500):
        root = tmp_path / f"{op}-{n}"
        g = _prepare(root)
        pid = os.fork()
        if pid == 0:  # the child: run the operation, die at call n or exit 0 when it made fewer calls
            code = 0
            try:
                _operation(g, op, _FaultAt(n, kill=True))
            except BaseException:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, f"{op}: the child failed without a kill at call {n}"
            assert _check_after(root, op) == "done"
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        killed += 1
        _check_after(root, op)
    else:
        pytest.fail("the operation never completed")
    assert killed >= (8 if op == "register" else 4)
