"""invoke matrix: distros side by side as isolated child processes, their output prefixed, one result per
distro whatever happens to it, Ctrl-C passed to every child and nothing left running, the image sources that
cannot be had skipped with the reason, and the combined report (JUnit read back with a JUnit parser, the
HTML grid rendered in a real browser).

The children here are a stand-in program (tests/matrix_child.py) so that scheduling, failure and Ctrl-C can
be driven exactly; the VM lane runs the matrix on real builds (tests/test_matrix_vm.py)."""

from __future__ import annotations

import dataclasses
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagekit.config import distros as table
from imagekit.config.distros import Distro, SourceKind
from imagekit.core.errors import InputError
from imagekit.matrix import MatrixOptions, MatrixPlan, Status, run_matrix
from imagekit.matrix.plan import Host, default_jobs, plan_matrix, source_reachable, vcpus_per_vm
from imagekit.matrix.result import read_result

REPO = Path(__file__).resolve().parent.parent
IDS = ["debian-11", "debian-12", "debian-13"]


def _plan(ids: list[str], jobs: int) -> MatrixPlan:
    t = table.default_table()
    return MatrixPlan(run=[t[i] for i in ids], skipped={}, jobs=jobs, cpus=1, memory_mib=1024, accel="tcg",
                      host=Host(cores=2, mem_available_mib=8000, kvm=False))


def _command(behaviours: dict[str, str], shared: Path):  # type: ignore[no-untyped-def]
    def command(d: Distro, report_dir: Path, cpus: int, memory_mib: int) -> list[str]:
        return [sys.executable, "-m", "tests.matrix_child", behaviours[d.id], d.id, str(report_dir), str(shared)]
    return command


def _run(tmp_path: Path, behaviours: dict[str, str], jobs: int) -> tuple[list, str]:  # type: ignore[type-arg]
    shared = tmp_path / "shared"
    shared.mkdir()
    out = io.StringIO()
    outcomes = run_matrix(_plan(list(behaviours), jobs),
                          MatrixOptions(report_dir=tmp_path / "rep", command=_command(behaviours, shared), tty=False,
                                        out=out))
    return outcomes, out.getvalue()


def _max_overlap(events: Path) -> int:
    running = peak = 0
    for line in events.read_text().splitlines():
        running += 1 if line.startswith("start ") else -1
        peak = max(peak, running)
    return peak


@pytest.fixture(autouse=True)
def _importable_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))


def test_distros_run_side_by_side_up_to_jobs(tmp_path: Path) -> None:
    # The first two wait for each other: they pass only if the matrix runs them at the same time.
    outcomes, _ = _run(tmp_path, {"debian-11": "wait-peer", "debian-12": "wait-peer", "debian-13": "pass"}, jobs=2)
    assert [(o.distro, o.status) for o in outcomes] == [
        ("debian-11", Status.PASSED), ("debian-12", Status.PASSED), ("debian-13", Status.PASSED)]
    assert _max_overlap(tmp_path / "shared" / "events") == 2


def test_jobs_1_runs_one_at_a_time(tmp_path: Path) -> None:
    outcomes, _ = _run(tmp_path, {"debian-11": "pass", "debian-12": "pass", "debian-13": "pass"}, jobs=1)
    assert all(o.status is Status.PASSED for o in outcomes)
    assert _max_overlap(tmp_path / "shared" / "events") == 1


def test_a_failure_never_stops_the_others_and_each_result_is_its_own(tmp_path: Path) -> None:
    outcomes, text = _run(tmp_path, {"debian-11": "fail", "debian-12": "pass", "debian-13": "no-result"}, jobs=2)
    by = {o.distro: o for o in outcomes}
    assert by["debian-11"].status is Status.FAILED
    assert "the verify VM did not provision" in by["debian-11"].reason
    assert by["debian-12"].status is Status.PASSED
    assert by["debian-12"].result["version"] == "1.2.3"
    # No result.json from the child: failed, said so, and the matrix writes the result for it.
    assert by["debian-13"].status is Status.FAILED
    assert "exited with code 3" in by["debian-13"].reason and "output.log" in by["debian-13"].reason
    lost = read_result(tmp_path / "rep" / "debian-13")
    assert lost is not None and lost["status"] == "failed"
    assert (tmp_path / "rep" / "debian-13" / "output.log").read_text() == "about to crash\n"
    # Stages come from the child's step lines.
    names = [s["name"] for s in by["debian-12"].result["stages"]]
    assert names == ["base image", "build VM: checks", "build VM (provision … capture)"]
    assert "debian-11 | " in text and "== FAILED" in text


def test_a_passing_result_from_a_failing_process_is_not_trusted(tmp_path: Path) -> None:
    outcomes, _ = _run(tmp_path, {"debian-12": "lie"}, jobs=1)
    assert outcomes[0].status is Status.FAILED
    assert "exited with code 2" in outcomes[0].reason


def test_output_is_prefixed_escaped_and_bounded_and_the_log_keeps_it_whole(tmp_path: Path) -> None:
    outcomes, text = _run(tmp_path, {"debian-12": "noisy", "debian-13": "pass"}, jobs=2)
    assert all(o.status is Status.PASSED for o in outcomes)
    lines = [ln for ln in text.splitlines() if "bell" in ln]
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("debian-12 | bell\\x07 esc\\x1b[31m red ")
    assert "\x1b" not in text and "\x07" not in text
    assert len(line) < 4200 and "more characters in output.log" in line
    raw = (tmp_path / "rep" / "debian-12" / "output.log").read_bytes()
    assert b"bell\x07 esc\x1b[31m red " + b"x" * 9000 + b"\n" in raw
    # Every line of debian-13's own output carries its prefix.
    own = (tmp_path / "rep" / "debian-13" / "output.log").read_text().splitlines()
    assert own and all(f"debian-13 | {ln}" in text.splitlines() for ln in own)


_INTERRUPT_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import imagekit.matrix.run as mrun
    from tests.test_matrix import _command, _plan
    from imagekit.matrix import MatrixOptions, run_matrix
    behaviours, jobs, rep, shared, grace = json.loads(sys.argv[1])
    mrun.STOP_GRACE = grace
    try:
        run_matrix(_plan(list(behaviours), jobs), MatrixOptions(report_dir=Path(rep),
                   command=_command(behaviours, Path(shared)), tty=False))
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
        sys.exit(130)
""")


def _interrupt(tmp_path: Path, behaviours: dict[str, str], jobs: int, grace: float, sig: int) -> tuple[int, str]:
    shared = tmp_path / "shared"
    shared.mkdir()
    rep = tmp_path / "rep"
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPT_SCRIPT,
                             json.dumps([behaviours, jobs, str(rep), str(shared), grace])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while len(list(shared.glob("started-*"))) < jobs:
        assert time.monotonic() < deadline, "the children never started"
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes only once reaped; /proc tells.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_reaches_every_child_starts_nothing_more_and_leaves_nothing_running(tmp_path: Path,
                                                                                    sig: int) -> None:
    behaviours = {"debian-11": "wait-sigint", "debian-12": "wait-sigint", "debian-13": "pass"}
    rc, out = _interrupt(tmp_path, behaviours, jobs=2, grace=60, sig=sig)
    assert rc == 130 and "INTERRUPTED" in out
    shared = tmp_path / "shared"
    assert (shared / "cleaned-debian-11").exists() and (shared / "cleaned-debian-12").exists()
    assert not (shared / "pid-debian-13").exists(), "a distro started after Ctrl-C"
    for i in ("debian-11", "debian-12"):
        assert not _alive(int((shared / f"pid-{i}").read_text()))
        res = read_result(tmp_path / "rep" / i)
        assert res is not None and res["status"] == "interrupted"
    waiting = read_result(tmp_path / "rep" / "debian-13")
    assert waiting is not None and waiting["status"] == "interrupted" and "not started" in waiting["error"]


def test_a_child_that_ignores_ctrl_c_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    rc, _ = _interrupt(tmp_path, {"debian-12": "ignore-sigint", "debian-13": "wait-sigint"}, jobs=2, grace=1.0,
                       sig=signal.SIGINT)
    assert rc == 130
    shared = tmp_path / "shared"
    assert not _alive(int((shared / "pid-debian-12").read_text()))
    res = read_result(tmp_path / "rep" / "debian-12")
    assert res is not None and res["status"] == "interrupted"  # killed by the matrix (SIGKILL), said so
    assert "was killed 1 s after Ctrl-C" in res["error"]


# --- what runs and how many at once -----------------------------------------------------------------------


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def _download(url: str, credentials: str = "") -> Distro:
    d = table.default_table()["ubuntu-24.04"]
    assert d.source.kind is SourceKind.DOWNLOAD
    src = dataclasses.replace(d.source, url=url + "/img.qcow2", checksum_url=url + "/SHA256SUMS",
                              credentials=credentials)
    return dataclasses.replace(d, source=src)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_download_that_answers_runs_one_that_cannot_be_reached_or_needs_credentials_is_skipped(
        http_server: str) -> None:
    ok, why = source_reachable(_download(http_server))
    assert ok, why  # even a 404: the server answers, so the build runs and fails with its own message
    ok, why = source_reachable(_download(f"http://127.0.0.1:{_closed_port()}"))
    assert not ok and "cannot reach 127.0.0.1" in why
    ok, why = source_reachable(_download(http_server, credentials="a Red Hat subscription"))
    assert not ok and why == "the download needs a Red Hat subscription"
    assert source_reachable(table.default_table()["debian-12"])[0]


def test_plan_skips_what_cannot_be_had_and_keeps_the_order(http_server: str) -> None:
    t = dict(table.default_table())
    t["ubuntu-24.04"] = _download(f"http://127.0.0.1:{_closed_port()}")
    t["ubuntu-22.04"] = dataclasses.replace(_download(http_server), id="ubuntu-22.04")
    plan = plan_matrix(["ubuntu-24.04", "debian-12", "ubuntu-22.04"], distros=t, kvm=False)
    assert [d.id for d in plan.run] == ["debian-12", "ubuntu-22.04"]
    assert list(plan.skipped) == ["ubuntu-24.04"]
    with pytest.raises(InputError, match="allowed: 1 to 32"):
        plan_matrix(["debian-12"], jobs=33, distros=t, kvm=False)
    with pytest.raises(InputError, match="unknown distro 'nope'"):
        plan_matrix(["nope"], distros=t, kvm=False)


def test_default_jobs_follow_cores_and_memory() -> None:
    # TCG: one distro per core; KVM: two per core; never more than memory holds or than there are distros.
    assert default_jobs(Host(cores=2, mem_available_mib=23000, kvm=False), 1024, selected=5) == 2
    assert default_jobs(Host(cores=2, mem_available_mib=23000, kvm=True), 1024, selected=5) == 4
    assert default_jobs(Host(cores=8, mem_available_mib=4096, kvm=False), 1024, selected=8) == 2
    assert default_jobs(Host(cores=8, mem_available_mib=1000, kvm=False), 1024, selected=8) == 1
    assert default_jobs(Host(cores=8, mem_available_mib=64000, kvm=False), 1024, selected=3) == 3
    # The vCPUs per VM share the cores among the VMs running at once, 1 to 2.
    assert vcpus_per_vm(Host(cores=2, mem_available_mib=0, kvm=False), jobs=2) == 1
    assert vcpus_per_vm(Host(cores=2, mem_available_mib=0, kvm=False), jobs=1) == 2
    assert vcpus_per_vm(Host(cores=16, mem_available_mib=0, kvm=False), jobs=2) == 2


_TTY_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from tests.test_matrix import _command, _plan
    from imagekit.matrix import MatrixOptions, run_matrix
    behaviours, rep, shared = json.loads(sys.argv[1])
    assert sys.stdout.isatty()
    run_matrix(_plan(list(behaviours), 2), MatrixOptions(report_dir=Path(rep),
               command=_command(behaviours, Path(shared))))
""")


def test_on_a_terminal_a_live_table_shows_each_distros_state(tmp_path: Path) -> None:
    import pty

    shared = tmp_path / "shared"
    shared.mkdir()
    behaviours = {"debian-12": "pass", "debian-13": "fail"}
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", _TTY_SCRIPT, json.dumps([behaviours, str(tmp_path / "rep"),
                                                                            str(shared)])],
                            stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "COLUMNS": "120",
                                                                           "TERM": "xterm"})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "imagekit matrix: 2 to run, 2 at once" in text
    assert "\x1b[" in text  # the table is redrawn in place (cursor movement), not appended line by line
    final = text[text.rindex("imagekit matrix: 2 to run"):]
    rows = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:4]] for ln in final.splitlines()
            if ln.count("│") >= 4 and ln.split("│")[1].strip().startswith("debian-")}
    assert rows["debian-12"][0] == "passed"
    assert rows["debian-13"][0] == "failed" and "the verify VM did not provision" in rows["debian-13"][1]
    assert "debian-13 | " in text  # the children's lines still go by, prefixed
