"""invoke matrix on real VMs: two distros provisioned and checked side by side by their own agents, a
download that cannot be reached skipped with the reason, one combined report; and Ctrl-C in the middle of
two real builds leaves no QEMU, no namespace child, no staging directory and no version behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
INVOKE = [str(REPO / ".venv" / "bin" / "invoke"), "--search-root", str(REPO)]


def _marked_processes(mark: str) -> list[str]:
    """Live processes that inherited this test's mark in their environment: the matrix's children and all
    they started (QEMU, its namespace child, its fabric keeper), and nothing of the tests beside this one."""
    found = []
    needle = f"IMAGEKIT_TEST_MARK={mark}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().split(")")[1].split()[0]
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z":
            found.append(args[:200])
    return found


def _env(tmp_path: Path) -> tuple[str, dict[str, str]]:
    mark = os.urandom(8).hex()
    return mark, {**os.environ, "IMAGEKIT_IMAGES": str(tmp_path / "gallery"), "IMAGEKIT_TEST_MARK": mark}


def test_matrix_checks_two_distros_side_by_side_and_skips_what_cannot_be_had(tmp_path: Path) -> None:
    out = tmp_path / "m"
    mark, env = _env(tmp_path)
    res = subprocess.run([*INVOKE, "matrix", "--distro", "debian-12", "--distro", "debian-12-cloudinit",
                          "--distro", "ubuntu-24.04", "--check-only", "--jobs", "2", "--cpus", "1",
                          "--report-dir", str(out)], capture_output=True, text=True, timeout=1800, cwd=REPO,
                         env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    lines = res.stdout.splitlines()
    # Both ran at once: each one's output starts before the other's ends.
    first = {i: next(n for n, ln in enumerate(lines) if ln.startswith(f"{i:<19} | ")) for i in
             ("debian-12", "debian-12-cloudinit")}
    last = {i: max(n for n, ln in enumerate(lines) if ln.startswith(f"{i:<19} | ")) for i in first}
    assert first["debian-12"] < last["debian-12-cloudinit"] and first["debian-12-cloudinit"] < last["debian-12"]
    summary = json.loads((out / "summary.json").read_text())
    by = {r["distro"]: r for r in summary["distros"]}
    assert by["debian-12"]["status"] == by["debian-12-cloudinit"]["status"] == "passed"
    assert by["ubuntu-24.04"]["status"] == "skipped" and "cannot reach" in by["ubuntu-24.04"]["reason"]
    # Each distro's own check report, made by its own child run, with the agent it was provisioned by.
    for i, agent in (("debian-12", "waagent"), ("debian-12-cloudinit", "cloud-init")):
        rep = json.loads((out / i / "report.json").read_text())
        assert rep["distro"] == i and rep["agent"] == agent and rep["ok"] is True
        assert by[i]["checks"].get("pass", 0) >= 25 and "fail" not in by[i]["checks"]
    assert "1 skipped" in res.stdout and (out / "index.html").is_file() and (out / "junit.xml").is_file()
    assert _marked_processes(mark) == []


def test_ctrl_c_in_the_middle_of_two_real_builds_leaves_nothing_behind(tmp_path: Path) -> None:
    gallery = tmp_path / "gallery"
    out = tmp_path / "m"
    mark, env = _env(tmp_path)
    proc = subprocess.Popen([*INVOKE, "matrix", "--distro", "debian-12", "--distro", "debian-12-cloudinit",
                             "--jobs", "2", "--cpus", "1", "--report-dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True,
                            env=env)
    names = ("process=ik-debian-12-build", "process=ik-debian-12-cloudinit-build")
    try:
        deadline = time.monotonic() + 600
        while not all(any(n in p for p in _marked_processes(mark)) for n in names):
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the two build VMs never ran at once"
            time.sleep(1)
        time.sleep(5)  # both guests are booting now
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the foreground job
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, output[-4000:]
    assert "Traceback" not in output
    assert _marked_processes(mark) == []
    for i in ("debian-12", "debian-12-cloudinit"):
        res = json.loads((out / i / "result.json").read_text())
        assert res["status"] == "interrupted", res
    # Nothing half-made in the gallery: no version, no staging directory (only the lock files).
    left = [p.relative_to(gallery).as_posix() for p in gallery.rglob("*") if p.name != ".lock"] \
        if gallery.exists() else []
    assert left == [], left
