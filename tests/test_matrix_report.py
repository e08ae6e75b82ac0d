"""The matrix's combined report from per-distro report directories (what `invoke matrix` and `--merge` of CI
artifacts both make): JUnit read back with a JUnit parser, summary.json, and index.html rendered by a real
browser (headless Chromium) whose grid links reach each check's evidence in the distro's own report."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from junitparser import Failure, JUnitXml, Skipped

from imagekit.checks import RunInfo, run_checks, write_reports
from imagekit.core.errors import BuildError, InputError
from imagekit.core.log import setup_logging, step
from imagekit.matrix import merge_reports, recording_result
from imagekit.matrix.result import read_result
from tests.guest_double import healthy_waagent
from tests.test_checks import make_ctx

REPO = Path(__file__).resolve().parent.parent
INVOKE = [str(REPO / ".venv" / "bin" / "invoke"), "--search-root", str(REPO)]


def _write_result(d: Path, distro: str, status: str, error: str = "", **extra: object) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "result.json").write_text(json.dumps({
        "schema": "imagekit.result/1", "distro": distro, "task": "build", "status": status, "error": error,
        "started": "2026-12-02T10:00:00+00:00", "elapsed": 300.0,
        "stages": [{"name": "base image", "seconds": 1.5, "ok": True, "depth": 0}], **extra}))


def _check_reports(d: Path, hostname: str) -> list[str]:
    """Real check reports (the report writer over guest-double runs); returns the ids that did not pass."""
    answers = healthy_waagent()
    answers["hostname"] = hostname
    ctx, _ = make_ctx("debian-12", answers)
    runs = run_checks(ctx)
    write_reports(runs, d, RunInfo(distro="debian-12", agent="waagent"))
    return [r.check.id for r in runs if r.result.status.value in ("fail", "error")]


@pytest.fixture
def artifacts(tmp_path: Path) -> dict[str, object]:
    """Three CI artifacts as download-artifact lays them out: one directory per distro, each elsewhere."""
    a = tmp_path / "artifacts"
    ok = a / "reports-debian-12" / "debian-12"
    _write_result(ok, "debian-12", "passed", version="12.0.2026120201", image="/images/debian-12/12.0.2026120201")
    clean = _check_reports(ok / "build", "ikvm\n")
    bad_verify = _check_reports(ok / "verify", "localhost\n")
    _write_result(a / "reports-debian-13" / "debian-13", "debian-13", "failed", "verify VM: 1 check(s) failed")
    _write_result(a / "reports-ubuntu-24.04" / "ubuntu-24.04", "ubuntu-24.04", "skipped",
                  "cannot reach cloud-images.ubuntu.com from this machine")
    return {"dir": a, "clean": clean, "bad_verify": bad_verify}


def test_junit_summary_and_markdown(artifacts: dict[str, object], tmp_path: Path) -> None:
    a = artifacts["dir"]
    assert isinstance(a, Path)
    assert artifacts["clean"] == [] and artifacts["bad_verify"] == ["provisioning.hostname"]
    out = tmp_path / "merged"
    summary = merge_reports(sorted(a.iterdir()), out)
    assert summary["totals"] == {"passed": 1, "failed": 1, "skipped": 1, "interrupted": 0}
    xml = JUnitXml.fromfile(str(out / "junit.xml"))
    suites = {s.name: s for s in xml}
    assert set(suites) == {"debian-12", "debian-13", "ubuntu-24.04"}
    d12 = list(suites["debian-12"])
    classes = {c.classname for c in d12}
    assert classes == {"debian-12.pipeline", "debian-12.build", "debian-12.verify"}
    failed = [(c.classname, c.name) for c in d12 if any(isinstance(r, Failure) for r in c.result)]
    assert failed == [("debian-12.verify", "provisioning.hostname")]
    (pipeline13,) = list(suites["debian-13"])
    assert any(isinstance(r, Failure) and "verify VM" in (r.message or "") for r in pipeline13.result)
    (skip,) = list(suites["ubuntu-24.04"])
    assert any(isinstance(r, Skipped) and "cannot reach" in (r.message or "") for r in skip.result)
    md = (out / "summary.md").read_text()
    assert "| debian-12 | passed | 12.0.2026120201 |" in md
    assert "| ubuntu-24.04 | skipped |" in md
    # The per-distro directories came along, so every link of the report stays inside it.
    assert (out / "debian-12" / "verify" / "report.html").is_file()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[tuple[str, str, str]]] = {}  # distro → (check, class, href)
        self.ids: set[str] = set()
        self._row: str | None = None
        self._cell: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "tr" and a.get("id", "").startswith("row-"):
            self._row = a["id"][4:]
            self.rows[self._row] = []
        if tag == "td" and "cell" in a.get("class", "").split() and self._row:
            self._cell = (a.get("data-check", ""), a.get("class", "").split()[-1])
            self.rows[self._row].append((*self._cell, ""))
        if tag == "a" and self._cell and self._row:
            self.rows[self._row][-1] = (*self._cell, a.get("href", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "tr"):
            self._cell = None


def _chromium(*args: str) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed (./ik setup installs it)"
    res = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=" + os.environ.get(
        "TMPDIR", "/tmp") + f"/ik-chromium-{os.getpid()}", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_the_grid_renders_in_a_browser_and_every_cell_links_to_its_evidence(artifacts: dict[str, object],
                                                                             tmp_path: Path) -> None:
    a = artifacts["dir"]
    assert isinstance(a, Path)
    out = tmp_path / "merged"
    merge_reports(sorted(a.iterdir()), out)
    dom = _chromium("--dump-dom", (out / "index.html").as_uri())
    grid = _Links()
    grid.feed(dom)
    assert set(grid.rows) == {"debian-12", "debian-13", "ubuntu-24.04"}
    cells = grid.rows["debian-12"]
    assert len(cells) > 20
    assert {c for c, cls, _ in cells if cls == "fail"} == {"provisioning.hostname"}
    # A distro with no check report (failed early, or skipped) has a row of empty cells, no links.
    assert all(cls == "none" and not href for _, cls, href in grid.rows["ubuntu-24.04"])
    assert "cannot reach cloud-images.ubuntu.com" in dom and "verify VM: 1 check(s) failed" in dom
    targets: dict[Path, set[str]] = {}
    for check, _, href in cells:
        assert href, f"no link for {check}"
        u = urlparse(href)
        assert not u.scheme and not u.netloc, href  # relative: the report directory moves as one
        assert u.fragment == check
        targets.setdefault((out / unquote(u.path)).resolve(), set()).add(check)
    assert {p.relative_to(out.resolve()).as_posix() for p in targets} == {"debian-12/build/report.html",
                                                                       "debian-12/verify/report.html"}
    for page, wanted in targets.items():
        seen = _Links()
        seen.feed(_chromium("--dump-dom", page.as_uri()))
        assert wanted <= seen.ids, f"{page}: no element for {sorted(wanted - seen.ids)}"
    shot = tmp_path / "grid.png"
    _chromium(f"--screenshot={shot}", "--window-size=1400,900", (out / "index.html").as_uri())
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1400


def test_merge_refuses_bad_input_and_changes_nothing(artifacts: dict[str, object], tmp_path: Path) -> None:
    a = artifacts["dir"]
    assert isinstance(a, Path)
    with pytest.raises(InputError, match="not a directory"):
        merge_reports([tmp_path / "nope"], tmp_path / "m1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no distro result found"):
        merge_reports([tmp_path / "empty"], tmp_path / "m2")
    twin = tmp_path / "twin" / "debian-12"
    _write_result(twin, "debian-12", "failed", "other run")
    with pytest.raises(InputError, match="two results for debian-12"):
        merge_reports([a / "reports-debian-12", tmp_path / "twin"], tmp_path / "m3")
    # An output directory that already holds another debian-12 is never overwritten.
    out = tmp_path / "m4"
    _write_result(out / "debian-12", "debian-12", "passed")
    before = hashlib.sha256((out / "debian-12" / "result.json").read_bytes()).hexdigest()
    with pytest.raises(InputError, match="would overwrite it"):
        merge_reports([a / "reports-debian-12"], out)
    assert hashlib.sha256((out / "debian-12" / "result.json").read_bytes()).hexdigest() == before
    assert sorted(p.name for p in out.iterdir()) == ["debian-12"]  # no half-copied directory left


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INVOKE, "matrix", *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_cli_merge_exit_codes(artifacts: dict[str, object], tmp_path: Path) -> None:
    a = artifacts["dir"]
    assert isinstance(a, Path)
    res = _cli("--merge", str(a / "reports-debian-12"), "--merge", str(a / "reports-debian-13"),
               "--report-dir", str(tmp_path / "m1"))
    assert res.returncode == 1, res.stderr
    assert [ln.split()[:2] for ln in res.stdout.splitlines()[1:3]] == [["debian-12", "PASSED"],
                                                                       ["debian-13", "FAILED"]]
    res = _cli("--merge", str(a / "reports-debian-12"), "--merge", str(a / "reports-ubuntu-24.04"),
               "--report-dir", str(tmp_path / "m2"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed, 0 failed, 1 skipped" in res.stdout
    res = _cli("--strict", "--merge", str(a / "reports-ubuntu-24.04"), "--report-dir", str(tmp_path / "m3"))
    assert res.returncode == 1 and "--strict" in res.stderr
    res = _cli("--merge", str(tmp_path / "missing"), "--report-dir", str(tmp_path / "m4"))
    assert res.returncode == 1 and "not a directory" in res.stderr and "Traceback" not in res.stderr
    res = _cli("--merge", str(a))
    assert res.returncode == 1 and "--merge needs --report-dir" in res.stderr


def test_cli_refuses_bad_options() -> None:
    res = _cli("--jobs", "99")
    assert res.returncode == 1 and "--jobs: bad value 99; allowed: 1 to 32" in res.stderr
    res = _cli("--list", "--format", "yaml")
    assert res.returncode == 1 and "allowed: text, json, github" in res.stderr
    res = _cli("--format", "github")
    assert res.returncode == 1 and "--format goes with --list" in res.stderr
    res = _cli("--list", "--distro", "debian-12", "--distro", "nope")
    assert res.returncode == 1 and "unknown distro 'nope'" in res.stderr and "Traceback" not in res.stderr


def test_the_result_file_says_how_a_run_ended(tmp_path: Path) -> None:
    setup_logging()
    with recording_result(tmp_path / "ok", distro_id="debian-12", task="build") as rec:
        with step("base image"), step("inner"), step("too deep"):
            pass
        rec.update(version="12.0.1")
    ok = read_result(tmp_path / "ok")
    assert ok is not None
    assert (ok["status"], ok["error"], ok["version"]) == ("passed", "", "12.0.1")
    assert [(s["name"], s["depth"]) for s in ok["stages"]] == [("inner", 1), ("base image", 0)]
    with pytest.raises(BuildError), recording_result(tmp_path / "bad", distro_id="debian-12", task="build"):
        raise BuildError("the verify VM did not provision")
    bad = read_result(tmp_path / "bad")
    assert bad is not None and (bad["status"], bad["error"]) == ("failed", "the verify VM did not provision")
    with pytest.raises(KeyboardInterrupt), recording_result(tmp_path / "int", distro_id="debian-12", task="check"):
        raise KeyboardInterrupt
    stopped = read_result(tmp_path / "int")
    assert stopped is not None and stopped["status"] == "interrupted" and stopped["task"] == "check"
