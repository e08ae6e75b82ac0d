"""The reports are valid and complete: JUnit XML read back with a JUnit parser (as CI systems read it),
JSON with the documented shape, an HTML page that shows every check and the timeline, and a terminal
table; secrets never reach them; the `check` task exits non-zero when a check fails."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest
from junitparser import Error, Failure, JUnitXml, Skipped

from imagekit.checkrun import CheckOutcome, fabric_record, timeline
from imagekit.checks import CheckRun, RunInfo, Status, catalogue, run_checks, summary_table, write_reports
from imagekit.checks.registry import CheckResult
from imagekit.checks.report import Phase, phases_from_durations
from imagekit.config import distros
from tests.guest_double import PROFILE, healthy_waagent
from tests.test_checks import make_ctx

PASSWORD = "Rep0rt-Secret!"


def _runs() -> list[CheckRun]:
    answers = healthy_waagent()
    answers["hostname"] = "localhost\n"  # one failure
    ctx, _ = make_ctx("debian-12", answers, profile=replace(PROFILE, password=PASSWORD, disable_password_auth=False))
    runs = run_checks(ctx)
    # One crash and evidence with control characters and the password, as a last-line-of-defence test.
    crash = CheckRun(runs[0].check, CheckResult(Status.ERROR, "check crashed: boom",
                                                f"Traceback\n\x1b[31mred\x1b[0m\x00 {PASSWORD} <tag> & \"q\""), 0.01)
    return [*runs, replace(crash, check=replace(runs[0].check, id="test.crash", category="test"))]


def _info() -> RunInfo:
    phases, events = timeline({"qemu start": 0.4, "first console output": 2.1, "ready": 20.5, "ssh ready": 24.0,
                               "resource disk handled": 40.2, "checks done": 46.0})
    return RunInfo(distro="debian-12", agent="waagent", started=datetime(2026, 11, 22, 1, 0, tzinfo=UTC),
                   phases=phases, events=events, facts={"resource_disk_note": "VMBus lookup bypassed"},
                   console_log="/tmp/console.log")


@pytest.fixture
def written(tmp_path: Path) -> tuple[list[CheckRun], dict[str, Path]]:
    runs = _runs()
    return runs, write_reports(runs, tmp_path / "rep", _info(), secrets=[PASSWORD])


def test_junit_reads_back_with_a_junit_parser(written: tuple[list[CheckRun], dict[str, Path]]) -> None:
    runs, paths = written
    xml = JUnitXml.fromfile(str(paths["junit"]))
    cases = {case.name: case for suite in xml for case in suite}
    assert set(cases) == {r.check.id for r in runs}
    by_status = {r.check.id: r.result.status for r in runs}
    for cid, case in cases.items():
        kinds = {type(x) for x in case.result}
        expected = {Status.FAIL: {Failure}, Status.ERROR: {Error}, Status.SKIP: {Skipped}, Status.PASS: set()}
        assert kinds == expected[by_status[cid]], cid
    failure = next(x for x in cases["provisioning.hostname"].result if isinstance(x, Failure))
    assert "hostname is 'localhost'" in (failure.message or "")
    assert "$ hostname" in (failure.text or "")
    total = sum(1 for _ in cases)
    root = ET.parse(paths["junit"]).getroot()
    assert root.tag == "testsuites" and int(root.get("tests", "0")) == total
    assert int(root.get("failures", "0")) == sum(1 for s in by_status.values() if s is Status.FAIL)
    assert int(root.get("errors", "0")) == 1


def test_reports_never_carry_the_password(written: tuple[list[CheckRun], dict[str, Path]]) -> None:
    _, paths = written
    for p in paths.values():
        assert PASSWORD not in p.read_text(), p.name


def test_json_has_the_documented_shape(written: tuple[list[CheckRun], dict[str, Path]]) -> None:
    runs, paths = written
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == "imagekit.checks/1"
    assert data["distro"] == "debian-12" and data["ok"] is False
    assert data["counts"] == {s.value: sum(1 for r in runs if r.result.status is s) for s in Status}
    assert [c["id"] for c in data["checks"]] == [r.check.id for r in runs]
    for c in data["checks"]:
        assert set(c) == {"id", "title", "category", "verifies", "source", "status", "summary", "evidence", "seconds"}
        assert c["status"] in {"pass", "fail", "skip", "error"}
        assert isinstance(c["seconds"], float | int)
    assert data["timeline"]["events"][0] == {"name": "first console output", "at": 2.1}
    assert datetime.fromisoformat(data["started"]).year == 2026


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.stack: list[str] = []
        self.details = 0
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(a["id"] or "")
        if tag == "details":
            self.details += 1
        if tag in ("script", "link", "img") or (a.get("src") or "").startswith("http"):
            self.external.append(tag)
        if tag not in ("br", "meta"):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_html_shows_every_check_with_evidence_and_the_timeline(
        written: tuple[list[CheckRun], dict[str, Path]]) -> None:
    runs, paths = written
    text = paths["html"].read_text()
    parser = _Collector()
    parser.feed(text)
    assert parser.stack == [], "unclosed tags"
    assert parser.external == [], "the page must be self-contained"
    assert set(parser.ids) >= {r.check.id for r in runs}
    assert parser.details >= len(runs)
    for name in ("first console output", "ready", "ssh ready", "resource disk handled", "launch QEMU"):
        assert name in text
    assert "&lt;tag&gt; &amp;" in text  # evidence is escaped, not interpreted
    assert "FAILED" in text


def test_summary_table_lists_every_check_and_the_verdict() -> None:
    runs = _runs()
    table = summary_table(runs, colour=False)
    for r in runs:
        assert r.check.id in table
    assert table.splitlines()[-1].endswith("FAILED")
    assert "\x1b[" not in table
    assert "\x1b[31m" in summary_table(runs, colour=True)


def test_writes_leave_no_temporary_files(written: tuple[list[CheckRun], dict[str, Path]]) -> None:
    _, paths = written
    assert sorted(p.name for p in paths["html"].parent.iterdir()) == ["junit.xml", "report.html", "report.json"]


def test_timeline_and_fabric_record_helpers() -> None:
    phases, events = timeline({"qemu start": 0.5, "ready": 20.0, "first console output": 2.0})
    assert phases[0] == Phase("launch QEMU", -0.5, 0.0)
    assert [p.name for p in phases[1:]] == ["QEMU start-up until the firmware's first output",
                                            "until the agent reported Ready"]
    other, _ = timeline({"something new": 3.0})
    assert other[0].name == "QEMU started → something new"
    assert events == [("first console output", 2.0), ("ready", 20.0)]
    assert phases_from_durations({"a": 1.0, "b": 2.5}) == [Phase("a", 0.0, 1.0), Phase("b", 1.0, 3.5)]

    class Rep:
        def __init__(self, state: str, sub: str | None, at: float) -> None:
            self.state, self.substatus, self.description, self.at = state, sub, None, at

    class Fab:
        def reports(self) -> list[Rep]:
            return [Rep("NotReady", "Provisioning", 110.0), Rep("Ready", None, 120.5)]

    rec = fabric_record(Fab(), t0=100.0)
    assert [(r.state, r.seconds) for r in rec.health_reports] == [("NotReady", 10.0), ("Ready", 20.5)]


def test_check_task_exits_non_zero_when_a_check_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The task layer only: check_distro (which provisions a VM; see the VM tests) is replaced by one that
    returns a run with a failed check."""
    from invoke.context import Context
    from invoke.exceptions import Exit

    import tasks
    from imagekit import checkrun as pipeline

    runs = _runs()
    paths = write_reports(runs, tmp_path, _info())

    def fake_check_distro(distro: distros.Distro, **kw: object) -> CheckOutcome:
        return CheckOutcome(runs, _info(), paths)

    monkeypatch.setattr(pipeline, "check_distro", fake_check_distro)
    with pytest.raises(Exit) as exc:
        tasks.check(Context(), distro="debian-12", report_dir=str(tmp_path))
    assert exc.value.code == 1
    assert "check(s) did not pass" in str(exc.value.message)
    assert "provisioning.hostname" in str(exc.value.message) and "report.html" in str(exc.value.message)
    ok_runs = [r for r in runs if r.result.ok]
    monkeypatch.setattr(pipeline, "check_distro",
                        lambda distro, **kw: CheckOutcome(ok_runs, _info(), paths))
    tasks.check(Context(), distro="debian-12", report_dir=str(tmp_path))  # no exception: exit code 0
    with pytest.raises(Exit, match=r"unknown check (id|categories)"):
        tasks.check(Context(), distro="debian-12", only="nope")


def test_catalogue_is_listed_in_category_order() -> None:
    cats = [c.category for c in catalogue().values()]
    assert cats == sorted(cats, key=["provisioning", "resource-disk", "swap", "standard"].index)


def test_timeline_bars_stay_inside_the_chart() -> None:
    import re

    from imagekit.checks.report import report_html

    page = report_html(_runs(), _info())
    lefts = [float(x) for x in re.findall(r"left:(-?[\d.]+)%", page)]
    widths = [float(x) for x in re.findall(r"width:(-?[\d.]+)%", page)]
    assert lefts and min(lefts) >= 0 and max(lefts) <= 100
    assert widths and min(widths) >= 0 and max(widths) <= 100


def test_check_provisioned_runs_setup_checks_and_reports_for_a_provisioned_vm(tmp_path: Path) -> None:
    """The stage as the build and `invoke check` call it, on a provisioned VM whose guest is the test
    double (cloud-init: the set-up waits on `cloud-init status --wait`) and whose fabric recorded Ready."""
    import time
    from dataclasses import dataclass as dc
    from dataclasses import field as fld

    from imagekit.checkrun import check_provisioned
    from imagekit.core.log import Timings
    from tests.guest_double import CannedGuest, healthy_cloudinit

    @dc
    class Rep:
        state: str
        substatus: str | None
        description: str | None
        at: float

    @dc
    class Fab:
        t0: float

        def reports(self) -> list[Rep]:
            return [Rep("NotReady", "Provisioning", "Starting", self.t0 + 10), Rep("Ready", None, None, self.t0 + 12)]

    @dc
    class VM:
        timings: Timings
        t_qemu: float = fld(default_factory=lambda: time.monotonic() - 30)  # booted 30 s ago

        def mark(self, name: str) -> float:
            t = time.monotonic() - self.t_qemu
            self.timings.record(name, t)
            return t

    @dc
    class PVM:
        distro: distros.Distro
        guest: CannedGuest
        fabric: Fab
        profile: object
        timings: Timings
        console_log: Path
        vm: VM

    d = distros.get("debian-12-cloudinit")
    answers = healthy_cloudinit(swap=False)
    answers["cloud-init status --wait"] = "status: done\n"
    timings = Timings()
    timings.record("qemu start", 0.3)
    timings.record("ready", 12.0)
    timings.record("ssh ready", 20.0)
    vm = VM(timings)
    pvm = PVM(d, CannedGuest(answers), Fab(vm.t_qemu), PROFILE, timings, tmp_path / "console.log", vm)
    outcome = check_provisioned(pvm, report_dir=tmp_path / "rep")  # type: ignore[arg-type]
    assert outcome.ok, [(r.check.id, r.result.summary) for r in outcome.runs if not r.result.ok]
    assert pvm.guest.unanswered == []
    names = [e[0] for e in outcome.info.events]
    assert names[:2] == ["ready", "ssh ready"] and names[-2:] == ["resource disk handled", "checks done"]
    data = json.loads(outcome.reports["json"].read_text())
    ready = next(c for c in data["checks"] if c["id"] == "provisioning.ready-reported")
    assert "2. Ready (at 12.0 s)" in ready["evidence"]
    assert data["facts"]["resource_disk_plan"]["mount_point"] == "/mnt"


def test_the_guests_own_boot_phases_come_in_order_between_qemu_start_and_ready() -> None:
    phases, _ = timeline({"qemu start": 0.5, "first console output": 0.6, "boot loader": 1.5, "kernel started": 4.0,
                          "initrd started": 9.0, "userspace started": 20.0, "agent started": 30.0,
                          "login prompt": 41.0, "ready": 47.0, "ssh ready": 50.0})
    assert [(p.name, p.start, p.end) for p in phases[1:8]] == [
        ("QEMU start-up until the firmware's first output", 0.0, 0.6),
        ("firmware (SeaBIOS) until the boot loader", 0.6, 1.5),
        ("boot loader: menu, loading the kernel and initrd", 1.5, 4.0),
        ("kernel start-up", 4.0, 9.0),
        ("initrd: drivers and the root file system", 9.0, 20.0),
        ("userspace (systemd) until the agent starts", 20.0, 30.0),
        ("until the login prompt on the serial console", 30.0, 41.0),
    ]
