"""Reports of a check run: JUnit XML (what CI systems read), JSON, a terminal table and a readable HTML page.

Every file is written to a temporary file in the report directory and renamed into place, so a report
directory never holds a half-written file. Secrets passed to :func:`write_reports` are scrubbed from all
text as a last line of defence (checks already keep passwords and custom data out of their evidence).
"""

from __future__ import annotations

import html
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imagekit.checks.registry import CheckRun, Status, counts, overall_ok
from imagekit.core.fsutil import write_text_atomic

SCHEMA = "imagekit.checks/1"
# XML 1.0 forbids most control characters; console output and logs can carry them.
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True)
class Phase:
    """One span on the timeline, in seconds since the run started."""

    name: str
    start: float
    end: float


@dataclass
class RunInfo:
    """What the report says about the run besides the checks."""

    distro: str
    agent: str = ""
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished: datetime | None = None
    phases: list[Phase] = field(default_factory=list)
    events: list[tuple[str, float]] = field(default_factory=list)  # milestones, seconds since start
    facts: dict[str, Any] = field(default_factory=dict)
    console_log: str = ""


def phases_from_durations(steps: Mapping[str, float], start: float = 0.0) -> list[Phase]:
    """Consecutive phases from ordered step durations (e.g. :class:`imagekit.core.log.Timings`)."""
    out, t = [], start
    for name, seconds in steps.items():
        out.append(Phase(name, round(t, 3), round(t + float(seconds), 3)))
        t += float(seconds)
    return out


def default_report_dir(distro_id: str, root: Path | None = None) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return (root or Path("reports")) / f"{distro_id}-{stamp}"


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "«redacted»")
    return text


def _clean(text: str, secrets: Iterable[str]) -> str:
    return _XML_BAD.sub("�", _scrub(text, secrets))


# --- JUnit ------------------------------------------------------------------------------------------


def junit_xml(runs: Sequence[CheckRun], info: RunInfo, secrets: Iterable[str] = ()) -> str:
    """JUnit XML: one testsuite per category, one testcase per check; failure/error/skipped as usual."""
    secrets = tuple(secrets)
    c = counts(runs)
    total_time = sum(r.seconds for r in runs)
    root = ET.Element("testsuites", name=f"imagekit checks: {info.distro}", tests=str(len(runs)),
                      failures=str(c["fail"]), errors=str(c["error"]), skipped=str(c["skip"]),
                      time=f"{total_time:.3f}")
    categories: dict[str, list[CheckRun]] = {}
    for r in runs:
        categories.setdefault(r.check.category, []).append(r)
    for cat, items in categories.items():
        cc = counts(items)
        suite = ET.SubElement(root, "testsuite", name=f"{info.distro}.{cat}", tests=str(len(items)),
                              failures=str(cc["fail"]), errors=str(cc["error"]), skipped=str(cc["skip"]),
                              time=f"{sum(r.seconds for r in items):.3f}",
                              timestamp=info.started.strftime("%Y-%m-%dT%H:%M:%S"), hostname=info.distro)
        for r in items:
            case = ET.SubElement(suite, "testcase", classname=f"imagekit.{info.distro}.{cat}", name=r.check.id,
                                 time=f"{r.seconds:.3f}")
            summary = _clean(r.result.summary, secrets)
            evidence = _clean(r.result.evidence, secrets)
            if r.result.status is Status.FAIL:
                ET.SubElement(case, "failure", message=summary, type="CheckFailed").text = evidence
            elif r.result.status is Status.ERROR:
                ET.SubElement(case, "error", message=summary, type="CheckError").text = evidence
            elif r.result.status is Status.SKIP:
                ET.SubElement(case, "skipped", message=summary)
            ET.SubElement(case, "system-out").text = _clean(
                f"{r.check.verifies}\nsource: {r.check.source}\nresult: {r.result.summary}\n\n{r.result.evidence}",
                secrets)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --- JSON -------------------------------------------------------------------------------------------


def report_dict(runs: Sequence[CheckRun], info: RunInfo, secrets: Iterable[str] = ()) -> dict[str, Any]:
    secrets = tuple(secrets)
    return {
        "schema": SCHEMA,
        "distro": info.distro,
        "agent": info.agent,
        "started": info.started.isoformat(),
        "finished": (info.finished or datetime.now(UTC)).isoformat(),
        "ok": overall_ok(runs),
        "counts": dict(counts(runs)),
        "timeline": {
            "phases": [{"name": p.name, "start": p.start, "end": p.end} for p in info.phases],
            "events": [{"name": n, "at": t} for n, t in info.events],
        },
        "console_log": info.console_log,
        "facts": json.loads(_scrub(json.dumps(info.facts, default=str), secrets)),
        "checks": [
            {
                "id": r.check.id,
                "title": r.check.title,
                "category": r.check.category,
                "verifies": r.check.verifies,
                "source": r.check.source,
                "status": r.result.status.value,
                "summary": _scrub(r.result.summary, secrets),
                "evidence": _scrub(r.result.evidence, secrets),
                "seconds": r.seconds,
            }
            for r in runs
        ],
    }


# --- terminal ---------------------------------------------------------------------------------------

_COLOURS = {Status.PASS: "32", Status.FAIL: "31", Status.ERROR: "35", Status.SKIP: "33"}


def summary_table(runs: Sequence[CheckRun], *, colour: bool | None = None, width: int = 110) -> str:
    """A fixed-width table: status, id, summary; then the totals."""
    colour = sys.stdout.isatty() if colour is None else colour
    idw = max([len(r.check.id) for r in runs] + [5])
    lines = [f"{'STATUS':6}  {'CHECK':{idw}}  SUMMARY"]
    for r in runs:
        st = r.result.status
        label = f"{st.value.upper():6}"
        if colour:
            label = f"\x1b[{_COLOURS[st]}m{label}\x1b[0m"
        summary = r.result.summary.replace("\n", " ")
        room = max(20, width - idw - 10)
        if len(summary) > room:
            summary = summary[: room - 1] + "…"
        lines.append(f"{label}  {r.check.id:{idw}}  {summary}")
    c = counts(runs)
    lines.append(f"{len(runs)} checks: {c['pass']} passed, {c['fail']} failed, {c['error']} errors, "
                 f"{c['skip']} skipped — {'OK' if overall_ok(runs) else 'FAILED'}")
    return "\n".join(lines)


# --- HTML -------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} .sub{color:#666;margin-top:0}
.badge{display:inline-block;padding:.1em .6em;border-radius:.8em;font-weight:600;font-size:.85em;color:#fff}
.pass{background:#1a7f37}.fail{background:#cf222e}.error{background:#8250df}.skip{background:#9a6700}
.totals span{margin-right:1em} table{border-collapse:collapse;width:100%;margin:1em 0}
td,th{border-bottom:1px solid #ddd;padding:.4em .5em;text-align:left;vertical-align:top}
th{background:#f6f8fa} tr.st-fail td,tr.st-error td{background:#fff5f5}
details summary{cursor:pointer;color:#0969da} pre{background:#f6f8fa;padding:.6em;overflow:auto;
max-height:30em;white-space:pre-wrap;word-break:break-all;font-size:12px}
.why{color:#555;font-size:.9em} .src{color:#777;font-size:.85em}
.tl{position:relative;border-left:1px solid #bbb;margin:.5em 0 1.5em}
.tlrow{display:flex;align-items:center;height:1.6em} .tlname{width:16em;font-size:.9em;padding-right:.5em}
.tlbar{position:relative;flex:1;height:1em;background:#f0f0f0}
.tlbar div{position:absolute;top:0;height:100%;background:#0969da;border-radius:2px;min-width:2px}
.tlbar .ev{background:#cf222e;width:3px} .tlt{width:9em;font-size:.85em;color:#555;text-align:right}
"""


def _timeline_html(info: RunInfo) -> str:
    spans = [(p.name, p.start, p.end) for p in info.phases] + [(n, t, t) for n, t in info.events]
    if not spans:
        return "<p class='why'>No timings were recorded for this run.</p>"
    # Spans may start before 0 (launching QEMU precedes "QEMU started"): scale from the earliest start.
    origin = min(0.0, *(s for _, s, _ in spans))
    total = max(max(e for _, _, e in spans) - origin, 0.001)
    rows = []
    for name, start, end in sorted(spans, key=lambda s: (s[1], s[2])):
        left = 100 * (start - origin) / total
        if end > start:
            bar = f"<div style='left:{left:.2f}%;width:{100 * (end - start) / total:.2f}%'></div>"
            t = f"{start:.1f}–{end:.1f} s ({end - start:.1f} s)"
        else:
            bar = f"<div class='ev' style='left:{min(left, 99.5):.2f}%'></div>"
            t = f"at {start:.1f} s"
        rows.append(f"<div class='tlrow'><div class='tlname'>{html.escape(name)}</div>"
                    f"<div class='tlbar'>{bar}</div><div class='tlt'>{t}</div></div>")
    return "<div class='tl'>" + "".join(rows) + "</div>"


def report_html(runs: Sequence[CheckRun], info: RunInfo, secrets: Iterable[str] = ()) -> str:
    """A self-contained page: totals, the timeline, and every check with its evidence collapsible."""
    secrets = tuple(secrets)
    e = html.escape
    c = counts(runs)
    ok = overall_ok(runs)
    rows = []
    for r in runs:
        st = r.result.status.value
        evidence = _scrub(r.result.evidence, secrets) or "(no evidence recorded)"
        is_open = " open" if r.result.status in (Status.FAIL, Status.ERROR) else ""
        rows.append(
            f"<tr class='st-{st}' id='{e(r.check.id)}'><td><span class='badge {st}'>{st.upper()}</span></td>"
            f"<td><b>{e(r.check.title)}</b><br><code>{e(r.check.id)}</code></td>"
            f"<td>{e(_scrub(r.result.summary, secrets))}<div class='why'>{e(r.check.verifies)}</div>"
            f"<div class='src'>Source: {e(r.check.source)}</div>"
            f"<details{is_open}><summary>evidence</summary><pre>{e(evidence)}</pre></details></td>"
            f"<td>{r.seconds:.2f} s</td></tr>"
        )
    facts = json.dumps(info.facts, indent=1, default=str, sort_keys=True)
    verdict = f"<span class='badge {'pass' if ok else 'fail'}'>{'PASSED' if ok else 'FAILED'}</span>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imagekit checks: {e(info.distro)}</title>
<style>{_CSS}</style></head><body>
<h1>imagekit checks: {e(info.distro)} {verdict}</h1>
<p class="sub">agent {e(info.agent)} · started {e(info.started.strftime('%Y-%m-%d %H:%M:%S UTC'))}
{' · console log ' + e(info.console_log) if info.console_log else ''}</p>
<p class="totals"><span class="badge pass">{c['pass']} passed</span><span class="badge fail">{c['fail']} failed</span>
<span class="badge error">{c['error']} errors</span><span class="badge skip">{c['skip']} skipped</span></p>
<h2>Boot and provisioning timeline</h2>
{_timeline_html(info)}
<h2>Checks</h2>
<table><thead><tr><th>Status</th><th>Check</th><th>Result, what it verifies, evidence</th><th>Time</th></tr></thead>
<tbody>
{''.join(rows)}
</tbody></table>
<h2>Run facts</h2>
<details><summary>facts recorded by the run</summary><pre>{e(_scrub(facts, secrets))}</pre></details>
</body></html>
"""


def write_reports(runs: Sequence[CheckRun], report_dir: Path, info: RunInfo,
                  secrets: Iterable[str] = ()) -> dict[str, Path]:
    """Write junit.xml, report.json and report.html into ``report_dir`` (created); return their paths."""
    secrets = tuple(s for s in secrets if s)
    report_dir.mkdir(parents=True, exist_ok=True)
    out = {
        "junit": report_dir / "junit.xml",
        "json": report_dir / "report.json",
        "html": report_dir / "report.html",
    }
    # Reports are meant to be read (CI artifacts); secrets are scrubbed before this point.
    write_text_atomic(out["junit"], junit_xml(runs, info, secrets))
    write_text_atomic(out["json"], json.dumps(report_dict(runs, info, secrets), indent=2) + "\n")
    write_text_atomic(out["html"], report_html(runs, info, secrets))
    return out
