"""The matrix's combined report, made from per-distro report directories only (``result.json`` and the
check reports beside it), so the same code serves ``invoke matrix`` and ``invoke matrix --merge`` of the
directories that CI jobs uploaded.

Under the output directory: ``junit.xml`` (a test suite per distro: the pipeline's own outcome and every
check of every VM), ``summary.json``, ``index.html`` (a distro × check grid, each cell linking to that
check's evidence in the distro's own ``report.html``) and ``summary.md`` (for a CI job summary). Each
distro's directory sits at ``<out>/<distro>/``; a merged directory from elsewhere is copied there first.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imagekit.core.errors import InputError
from imagekit.core.fsutil import write_json_atomic, write_text_atomic
from imagekit.matrix.result import RESULT_FILE, Status, read_result

SCHEMA = "imagekit.matrix/1"
EVIDENCE_MAX = 4000  # characters of a check's evidence carried into the combined JUnit file
# The check report phases a distro directory can hold: a build's two VMs, or a check run's one.
PHASES = (("build", "build"), ("verify", "verify"), ("check", "."))
_CHECK_ORDER = {"fail": 0, "error": 1, "pass": 3, "skip": 4}  # which phase's result a grid cell shows


@dataclass
class DistroReport:
    distro: str
    dir: Path  # under the output directory
    result: dict[str, Any]
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)  # phase → its report.json

    @property
    def status(self) -> Status:
        try:
            return Status(str(self.result.get("status")))
        except ValueError:
            return Status.FAILED


def find_distro_dirs(sources: Sequence[Path]) -> list[Path]:
    """Each source is a distro's report directory (it holds result.json) or a directory of them."""
    found: list[Path] = []
    for src in sources:
        if not src.is_dir():
            raise InputError(f"{src}: not a directory; --merge takes report directories (each holding "
                             f"{RESULT_FILE}, or directories that do)")
        if read_result(src) is not None:
            found.append(src)
            continue
        subs = sorted(p for p in src.iterdir() if p.is_dir() and read_result(p) is not None)
        if not subs:
            raise InputError(f"{src}: no distro result found ({RESULT_FILE} in it or in a directory inside it)",
                             hint="a report directory of invoke matrix, build or check")
        found.extend(subs)
    return found


def _load(d: Path, out: Path) -> DistroReport:
    result = read_result(d)
    assert result is not None
    rep = DistroReport(distro=result["distro"], dir=d, result=result)
    for phase, sub in PHASES:
        try:
            data = json.loads((d / sub / "report.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("checks"), list):
            rep.phases[phase] = data
    return rep


def _place(src: Path, distro: str, out: Path) -> Path:
    """The distro's directory under ``out``: itself when it is there already, else a copy (made whole under a
    temporary name, then renamed; an existing different directory is never overwritten)."""
    dest = out / distro
    if dest.exists() and os.path.samefile(dest, src):
        return dest
    if src.resolve() == dest.resolve():
        return dest
    if dest.exists():
        raise InputError(f"{dest} exists and is not {src}: the merged report would overwrite it",
                         hint="merge into an empty directory")
    tmp = out / f".{distro}.merging-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, symlinks=True)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def merge_reports(sources: Sequence[Path], out: Path) -> dict[str, Any]:
    """Write the combined report for the distro directories in ``sources`` to ``out``; returns summary.json."""
    dirs = find_distro_dirs(sources)
    seen: dict[str, Path] = {}
    for d in dirs:
        res = read_result(d)
        assert res is not None
        if res["distro"] in seen and not os.path.samefile(seen[res["distro"]], d):
            raise InputError(f"two results for {res['distro']}: {seen[res['distro']]} and {d}",
                             hint="merge each distro's report directory once")
        seen[res["distro"]] = d
    out.mkdir(parents=True, exist_ok=True)
    reports = [_load(_place(d, distro, out), out) for distro, d in seen.items()]
    reports.sort(key=lambda r: r.distro)
    summary = summary_dict(reports, out)
    write_text_atomic(out / "junit.xml", junit_xml(reports))
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "index.html", index_html(reports, summary))
    write_text_atomic(out / "summary.md", summary_markdown(summary))
    return summary


def _counts(rep: DistroReport) -> dict[str, int]:
    c: dict[str, int] = {}
    for data in rep.phases.values():
        for chk in data["checks"]:
            c[str(chk.get("status"))] = c.get(str(chk.get("status")), 0) + 1
    return c


def summary_dict(reports: Sequence[DistroReport], out: Path) -> dict[str, Any]:
    rows = []
    for r in reports:
        res = r.result
        rows.append({
            "distro": r.distro, "status": r.status.value, "reason": res.get("error", ""),
            "task": res.get("task", ""), "elapsed": res.get("elapsed"), "stages": res.get("stages", []),
            "version": res.get("version"), "image": res.get("image"), "checks": _counts(r),
            "reports": {p: _report_link(r, p) for p in r.phases},
            "dir": os.path.relpath(r.dir, out),
        })
    totals = {s.value: sum(1 for r in reports if r.status is s) for s in Status}
    return {"schema": SCHEMA, "generated": datetime.now(UTC).isoformat(), "totals": totals, "distros": rows}


# --- JUnit ----------------------------------------------------------------------------------------------


def _xml_text(s: str) -> str:
    return "".join(ch for ch in s if ch in "\t\n\r" or " " <= ch <= "\ud7ff" or "\ue000" <= ch <= "\ufffd")


def junit_xml(reports: Sequence[DistroReport]) -> str:
    root = ET.Element("testsuites", name="imagekit matrix")
    for r in reports:
        suite = ET.SubElement(root, "testsuite", name=r.distro)
        cases = 0
        fails = errors = skips = 0
        case = ET.SubElement(suite, "testcase", classname=f"{r.distro}.pipeline", name=str(r.result.get("task")
                                                                                          or "build"))
        case.set("time", str(r.result.get("elapsed") or 0))
        cases += 1
        reason = _xml_text(str(r.result.get("error") or ""))
        if r.status is Status.SKIPPED:
            ET.SubElement(case, "skipped", message=reason[:500])
            skips += 1
        elif r.status is not Status.PASSED:
            el = ET.SubElement(case, "failure", message=reason.splitlines()[0][:500] if reason else r.status.value)
            el.text = reason
            fails += 1
        for phase, data in r.phases.items():
            for chk in data["checks"]:
                cases += 1
                c = ET.SubElement(suite, "testcase", classname=f"{r.distro}.{phase}", name=str(chk.get("id")))
                c.set("time", str(chk.get("seconds") or 0))
                st = chk.get("status")
                msg = _xml_text(str(chk.get("summary") or ""))[:500]
                ev = _xml_text(str(chk.get("evidence") or ""))[:EVIDENCE_MAX]
                if st == "fail":
                    ET.SubElement(c, "failure", message=msg).text = ev
                    fails += 1
                elif st == "error":
                    ET.SubElement(c, "error", message=msg).text = ev
                    errors += 1
                elif st == "skip":
                    ET.SubElement(c, "skipped", message=msg)
                    skips += 1
        suite.set("tests", str(cases))
        suite.set("failures", str(fails))
        suite.set("errors", str(errors))
        suite.set("skipped", str(skips))
        suite.set("time", str(r.result.get("elapsed") or 0))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --- HTML -----------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top}
th.check{writing-mode:vertical-rl;transform:rotate(180deg);font-weight:normal;font-size:.85em}
td.cell{text-align:center;font-size:.8em}
td.cell a{color:inherit;text-decoration:none;display:block}
.pass{background:#d9f2d9}.fail{background:#f7c6c6}.error{background:#e8c8f0}.skip{background:#f5ecc4}
.none{background:#f4f4f4;color:#999}
.passed{color:#176117}.failed{color:#a11}.skipped{color:#8a6d00}.interrupted{color:#a11}
"""


def _grid_columns(reports: Sequence[DistroReport]) -> list[str]:
    cols: list[str] = []
    for r in reports:
        for data in r.phases.values():
            for chk in data["checks"]:
                if chk.get("id") not in cols:
                    cols.append(str(chk.get("id")))
    return cols


def _report_link(r: DistroReport, phase: str) -> str:
    """The phase's report.html relative to index.html (every distro directory is ``<out>/<distro>/``)."""
    sub = dict(PHASES)[phase]
    return f"{r.distro}/report.html" if sub == "." else f"{r.distro}/{sub}/report.html"


def _cell(r: DistroReport, check_id: str) -> tuple[str, str, str]:
    """(css class, text, link) of a grid cell: the worst result of that check over the distro's VMs."""
    best: tuple[int, str, str, dict[str, Any]] | None = None
    for phase, data in r.phases.items():
        for chk in data["checks"]:
            if chk.get("id") == check_id:
                st = str(chk.get("status"))
                rank = _CHECK_ORDER.get(st, 2)
                if best is None or rank < best[0]:
                    best = (rank, st, phase, chk)
    if best is None:
        return "none", "—", ""
    _, st, phase, _ = best
    link = _report_link(r, phase) + "#" + check_id
    text = st.upper() + (f" ({phase})" if len(r.phases) > 1 and st != "pass" else "")
    return st, text, link


def index_html(reports: Sequence[DistroReport], summary: dict[str, Any]) -> str:
    e = html.escape
    cols = _grid_columns(reports)
    by_id = {row["distro"]: row for row in summary["distros"]}
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>imagekit matrix</title>",
             f"<style>{_CSS}</style></head><body><h1>imagekit matrix</h1>"]
    t = summary["totals"]
    parts.append("<p id='totals'>" + ", ".join(f"{n} {e(k)}" for k, n in t.items()) + "</p>")
    parts.append("<h2>Checks</h2><table id='grid'><thead><tr><th>distro</th><th>result</th>"
                 + "".join(f"<th class='check' title='{e(c)}'>{e(c)}</th>" for c in cols) + "</tr></thead><tbody>")
    for r in reports:
        first = next(iter(r.phases), None)
        name = (f"<a href='{e(_report_link(r, first))}'>{e(r.distro)}</a>" if first else
                f"<a href='{e(r.distro)}/{RESULT_FILE}'>{e(r.distro)}</a>")
        parts.append(f"<tr id='row-{e(r.distro)}'><th>{name}</th>"
                     f"<td class='{e(r.status.value)}'>{e(r.status.value)}</td>")
        for c in cols:
            cls, text, link = _cell(r, c)
            inner = f"<a href='{e(link)}'>{e(text)}</a>" if link else e(text)
            parts.append(f"<td class='cell {e(cls)}' data-check='{e(c)}'>{inner}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    parts.append("<h2>Distros</h2><table id='distros'><thead><tr><th>distro</th><th>result</th><th>version</th>"
                 "<th>elapsed</th><th>stages</th><th>reason</th></tr></thead><tbody>")
    for r in reports:
        row = by_id[r.distro]
        stages = "<br>".join(f"{e(s['name'])}: {float(s['seconds']):.1f} s" for s in row["stages"]
                             if isinstance(s, dict) and s.get("depth", 0) == 0 and "name" in s)
        version = e(str(row["version"])) if row.get("version") else "—"
        elapsed = f"{float(row['elapsed']):.0f} s" if row.get("elapsed") is not None else "—"
        parts.append(f"<tr class='{e(row['status'])}'><th>{e(r.distro)}</th><td>{e(row['status'])}</td>"
                     f"<td>{version}</td><td>{elapsed}</td><td>{stages or '—'}</td>"
                     f"<td><pre>{e(str(row['reason'] or ''))[:2000]}</pre></td></tr>")
    parts.append("</tbody></table>")
    skipped = [row for row in summary["distros"] if row["status"] == Status.SKIPPED.value]
    if skipped:
        parts.append("<h2>Skipped</h2><ul id='skipped'>" + "".join(
            f"<li><b>{e(row['distro'])}</b>: {e(str(row['reason']))}</li>" for row in skipped) + "</ul>")
    parts.append(f"<p>generated {e(summary['generated'])}; <a href='summary.json'>summary.json</a>, "
                 f"<a href='junit.xml'>junit.xml</a></p></body></html>\n")
    return "".join(parts)


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["## imagekit matrix", "", "| distro | result | version | elapsed | checks | reason |",
             "|---|---|---|---|---|---|"]
    for row in summary["distros"]:
        checks = ", ".join(f"{n} {k}" for k, n in sorted(row["checks"].items()))
        reason = str(row["reason"] or "").splitlines()[0][:200] if row["reason"] else ""
        reason = reason.replace("|", "\\|")
        elapsed = f"{float(row['elapsed']):.0f} s" if row.get("elapsed") is not None else ""
        lines.append(f"| {row['distro']} | {row['status']} | {row['version'] or ''} | {elapsed} | {checks} | "
                     f"{reason} |")
    t = summary["totals"]
    lines += ["", ", ".join(f"{n} {k}" for k, n in t.items()), ""]
    return "\n".join(lines)
