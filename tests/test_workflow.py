"""The CI workflow, .github/workflows/images.yml, checked without GitHub: actionlint passes on it (and fails on
broken copies, so the check can fail); the matrix job's own command is run here and what it writes to
$GITHUB_OUTPUT is parsed the way the runner parses it, then read with fromJSON as the build job's strategy
reads it; and the build, report and publish jobs are wired as the matrix needs (one job per distro that never
cancels the others, reports uploaded whatever happens, one merge of them all).

The distro ids the matrix must list are read from distros/*.toml here, not from imagekit's code."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from imagekit.matrix.result import SCHEMA

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "images.yml"
ALWAYS = {"always()", "${{ always() }}", "!cancelled()", "${{ !cancelled() }}"}
# How the runner starts a `shell: bash` step: the script in a file, run with these options.
BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]
KVM_RULE = 'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"'


# --- helpers ------------------------------------------------------------------------------------------------


def _workflow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(data, dict)
    return data


def _job(name: str) -> dict[str, Any]:
    job = _workflow()["jobs"][name]
    assert isinstance(job, dict)
    return job


def _needs(job: dict[str, Any]) -> list[str]:
    needs = job.get("needs", [])
    return [needs] if isinstance(needs, str) else list(needs)


def _steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job["steps"])


def _step_running(job: dict[str, Any], needle: str) -> dict[str, Any]:
    found = [s for s in _steps(job) if needle in s.get("run", "")]
    assert len(found) == 1, f"expected one step whose run: has {needle!r}, found {len(found)}"
    return found[0]


def _steps_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in _steps(job) if str(s.get("uses", "")).startswith(action + "@")]


def _step_index(job: dict[str, Any], step: dict[str, Any]) -> int:
    return next(i for i, s in enumerate(_steps(job)) if s is step)


def _actionlint() -> str:
    exe = Path(sys.executable).parent / "actionlint"
    if exe.is_file():
        return str(exe)
    found = shutil.which("actionlint")
    assert found, "actionlint is missing: it is a dev dependency (./ik setup, or pip install -e '.[dev]')"
    return found


def _lint(path: Path, project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_actionlint(), "-no-color", "-oneline", str(path)], cwd=project, capture_output=True,
                          text=True, timeout=120)


def parse_github_output(text: str) -> dict[str, str]:
    """$GITHUB_OUTPUT as the runner reads it: ``name=value`` lines, or ``name<<DELIMITER``, the value's lines,
    then the delimiter alone on a line; empty lines are skipped; a later value for a name replaces an earlier
    one; anything else is an error (the runner fails the step)."""
    lines = text.replace("\r\n", "\n").split("\n")
    out: dict[str, str] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line:
            continue
        eq, heredoc = line.find("="), line.find("<<")
        if eq >= 0 and (heredoc < 0 or eq < heredoc):
            name, value = line.split("=", 1)
        elif heredoc >= 0:
            name, delimiter = line.split("<<", 1)
            if not delimiter:
                raise ValueError(f"invalid format {line!r}: no delimiter")
            try:
                end = lines.index(delimiter, i)
            except ValueError:
                raise ValueError(f"matching delimiter not found {delimiter!r}") from None
            value = "\n".join(lines[i:end])
            i = end + 1
        else:
            raise ValueError(f"invalid format {line!r}")
        if not name:
            raise ValueError(f"invalid format {line!r}: the name must not be empty")
        out[name] = value
    return out


def _table() -> dict[str, dict[str, Any]]:
    """distros/*.toml by id, read with tomllib."""
    table: dict[str, dict[str, Any]] = {}
    for f in sorted((REPO / "distros").glob("*.toml")):
        with f.open("rb") as fh:
            entry = tomllib.load(fh)
        assert entry["id"] not in table, f"{f}: id {entry['id']!r} twice in the table"
        table[entry["id"]] = entry
    return table


def _sudo_stand_in(tmp_path: Path) -> dict[str, str]:
    """The steps run ./ik through `sudo -E` unless they already run as root; GitHub's runners have sudo without
    a password. Run as another user, this test puts a stand-in first on PATH that runs the command as is."""
    if os.geteuid() == 0:
        return {}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sudo = bin_dir / "sudo"
    sudo.write_text('#!/bin/sh\n[ "$1" = -E ] && shift\nexec "$@"\n')
    sudo.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _run_step(step: dict[str, Any], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run a step's script as the runner does: in the checkout, from a file, under `bash -eo pipefail`."""
    assert _workflow()["defaults"]["run"]["shell"] == "bash" and step.get("shell", "bash") == "bash"
    script = tmp_path / "step.sh"
    script.write_text(step["run"])
    return subprocess.run([*BASH, str(script)], cwd=REPO, env={**os.environ, **_sudo_stand_in(tmp_path), **env},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)


# --- (a) actionlint -----------------------------------------------------------------------------------------


def test_actionlint_passes_on_the_workflow() -> None:
    res = _lint(WORKFLOW, REPO)
    assert res.returncode == 0, f"actionlint:\n{res.stdout}{res.stderr}"
    assert res.stdout.strip() == "", res.stdout


# Each: the text replaced in a copy of the workflow, what replaces it, and what actionlint must then name.
BROKEN = {
    "a job that needs an undefined job": ("    needs: build\n    if: always()\n",
                                          "    needs: [build, no-such-job]\n    if: always()\n", "no-such-job"),
    "an input that is not defined": ("if: inputs.upload_vhd ||", "if: inputs.upload_vhdx ||", "upload_vhdx"),
    "an expression that does not parse": ("matrix: ${{ fromJSON(needs.matrix.outputs.matrix) }}",
                                          "matrix: ${{ fromJSON(needs.matrix.outputs.matrix }}", "[expression]"),
}


@pytest.mark.parametrize("what", BROKEN)
def test_actionlint_fails_on_a_broken_copy(what: str, tmp_path: Path) -> None:
    old, new, named = BROKEN[what]
    text = WORKFLOW.read_text()
    assert old in text, f"the workflow no longer has {old!r}: update this test's broken copies"
    broken = tmp_path / ".github" / "workflows" / "images.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new, 1))
    res = _lint(broken, tmp_path)
    assert res.returncode == 1, f"actionlint did not fail on {what} (exit {res.returncode}):\n{res.stdout}{res.stderr}"
    assert named in res.stdout, res.stdout


# --- (b) the matrix job's command, run here -----------------------------------------------------------------


def test_parse_github_output_reads_both_forms() -> None:
    text = 'a=1\n\nmatrix={"include":[]}\nnotes<<EOF_1\nline one\nx=y\nEOF_1\na=2\n'
    assert parse_github_output(text) == {"a": "2", "matrix": '{"include":[]}', "notes": "line one\nx=y"}
    with pytest.raises(ValueError, match="delimiter not found"):
        parse_github_output("notes<<EOF\nnever closed\n")
    with pytest.raises(ValueError, match="invalid format"):
        parse_github_output("no separator\n")


@pytest.mark.parametrize("distros", ["", "debian-12, debian-13-cloudinit"], ids=["whole table", "filtered"])
def test_matrix_job_output_is_the_distro_table(distros: str, tmp_path: Path) -> None:
    job = _job("matrix")
    step = _step_running(job, "./ik matrix --list --format github")
    assert "${{" not in step["run"], "the script must take the inputs from env:, not from inline expressions"
    # The step's env: as GitHub evaluates it for a manual run with these inputs (publish left unset).
    known = {"${{ inputs.distros }}": distros,
             "${{ (github.event_name == 'push' && startsWith(github.ref, 'refs/tags/')) || inputs.publish }}": "false"}
    env: dict[str, str] = {}
    for name, value in step.get("env", {}).items():
        assert value in known, f"env {name}: {value!r} is not an expression this test evaluates: add it"
        env[name] = known[value]
    output = tmp_path / "github_output"
    output.touch()
    res = _run_step(step, {**env, "GITHUB_OUTPUT": str(output)}, tmp_path)
    assert res.returncode == 0, f"the step failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
    outputs = parse_github_output(output.read_text())

    # The job output the build job's strategy reads, through the step output it names.
    m = re.fullmatch(r"\$\{\{\s*steps\.([\w-]+)\.outputs\.([\w-]+)\s*\}\}", job["outputs"]["matrix"])
    assert m and m[1] == step["id"], job["outputs"]["matrix"]
    assert _job("build")["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.matrix) }}"
    assert m[2] in outputs, f"the step wrote no {m[2]!r} output to $GITHUB_OUTPUT; it wrote {sorted(outputs)}"
    matrix = json.loads(outputs[m[2]])  # fromJSON
    assert isinstance(matrix, dict) and set(matrix) == {"include"} and isinstance(matrix["include"], list)

    table = _table()
    want = [i.strip() for i in distros.split(",") if i.strip()] or list(table)
    assert sorted(e["id"] for e in matrix["include"]) == sorted(want)
    assert len(matrix["include"]) == len(want)
    for e in matrix["include"]:
        t = table[e["id"]]
        src = t["source"]
        assert e["agent"] == t["agent"], e
        assert e["source"] == src["kind"] and e["source"] in ("bootstrap", "download"), e
        assert e["needs_credentials"] is (src["kind"] == "download" and bool(src.get("credentials"))), e
    assert outputs["publish"] == "false"


# --- (c) the build job ----------------------------------------------------------------------------------------


def test_build_job_runs_each_distro_and_always_uploads_its_reports() -> None:
    job = _job("build")
    assert "matrix" in _needs(job)
    assert job["strategy"]["fail-fast"] is False
    assert job["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.matrix) }}"

    build = _step_running(job, "./ik matrix --distro")
    cmd = build["run"] + "".join(str(v) for v in build.get("env", {}).values())
    assert "${{ matrix.id }}" in cmd and "--report-dir reports" in build["run"], build["run"]
    assert "--list" not in build["run"] and "--merge" not in build["run"]

    kvm = _step_running(job, KVM_RULE)
    assert "/dev/kvm" in kvm["run"] and "udevadm trigger --name-match=kvm" in kvm["run"]
    (cache,) = _steps_using(job, "actions/cache")
    assert "~/.cache/imagekit" in cache["with"]["path"].split("\n")
    key = cache["with"]["key"]
    assert "matrix.id" in key and "hashFiles(" in key, key
    for recipe in ("'distros/{0}.toml', matrix.id", "'imagekit/base/**'", "'pyproject.toml'"):
        assert recipe in key, key

    uploads = [s for s in _steps_using(job, "actions/upload-artifact")
               if s["with"]["path"] == "reports/${{ matrix.id }}"]
    assert len(uploads) == 1, "one upload of reports/${{ matrix.id }}"
    upload = uploads[0]
    assert upload.get("if") in ALWAYS, upload.get("if")
    assert "${{ matrix.id }}" in upload["with"]["name"], "each distro's artifact needs a name of its own"
    order = [_step_index(job, s) for s in (kvm, cache, build, upload)]
    assert order == sorted(order), "KVM, then the cache, then the build, then the upload"

    # The image goes up only when asked for (or for publishing), from the path result.json records.
    (pack,) = [s for s in _steps(job) if s.get("id") == "image"]
    assert "inputs.upload_vhd" in pack["if"] and "result.json" in str(pack["env"]) and '"image"' in pack["run"]


# --- (d) the report job, and publishing ---------------------------------------------------------------------


def test_report_job_merges_every_distro_report() -> None:
    job = _job("report")
    assert job["if"] in ALWAYS and "build" in _needs(job)
    (download,) = _steps_using(job, "actions/download-artifact")
    build_upload = next(s for s in _steps_using(_job("build"), "actions/upload-artifact")
                        if s["with"]["path"] == "reports/${{ matrix.id }}")
    assert fnmatch.fnmatch(build_upload["with"]["name"].replace("${{ matrix.id }}", "debian-12"),
                           download["with"]["pattern"])
    assert not download["with"].get("merge-multiple"), "each artifact must keep its own directory"
    merge = _step_running(job, "--merge")
    assert "./ik matrix" in merge["run"] and "--report-dir" in merge["run"]
    upload = next(s for s in _steps_using(job, "actions/upload-artifact") if s["with"]["name"] == "matrix-report")
    assert upload.get("if") in ALWAYS
    summary = _step_running(job, "$GITHUB_STEP_SUMMARY")
    assert summary.get("if") in ALWAYS and "summary.md" in summary["run"]


def _result(distro: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "distro": distro, "task": "build", "status": status, "error": "",
            "started": "2026-12-02T10:00:00+00:00", "elapsed": 61.5, "stages": [], **extra}


def test_report_job_merge_step_finds_the_downloaded_artifacts(tmp_path: Path) -> None:
    """The merge step run here on the layout download-artifact leaves (one directory per artifact, named after
    it), with result.json files made by hand: every distro is in the merged report."""
    job = _job("report")
    (download,) = _steps_using(job, "actions/download-artifact")
    artifacts = Path(download["with"]["path"].replace("${{ runner.temp }}", str(tmp_path)))
    results = {"debian-12": _result("debian-12", "passed", version="12.0.2026120201"),
               "almalinux-9": _result("almalinux-9", "skipped", error="cannot reach the vendor's server")}
    for distro, result in results.items():
        d = artifacts / f"reports-{distro}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(result))
    merge = _step_running(job, "--merge")
    res = _run_step(merge, {"RUNNER_TEMP": str(tmp_path)}, tmp_path)
    assert res.returncode == 0, f"the merge step failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
    (upload,) = [s for s in _steps_using(job, "actions/upload-artifact") if s["with"]["name"] == "matrix-report"]
    report = Path(upload["with"]["path"].replace("${{ runner.temp }}", str(tmp_path)))
    summary = json.loads((report / "summary.json").read_text())
    assert {r["distro"]: r["status"] for r in summary["distros"]} == {"debian-12": "passed", "almalinux-9": "skipped"}
    assert (report / "summary.md").is_file()


def test_publish_job_is_gated_and_calls_the_publish_task() -> None:
    job = _job("publish")
    assert set(_needs(job)) >= {"matrix", "build"}
    assert job["if"] == "needs.matrix.outputs.publish == 'true'"
    gate = _step_running(_job("matrix"), "./ik matrix --list")["env"]["PUBLISH"]
    assert "refs/tags/" in gate and "inputs.publish" in gate
    wf: dict[Any, Any] = _workflow()
    on = wf["on"] if "on" in wf else wf[True]  # YAML 1.1 reads a bare `on` key as true
    assert on["workflow_dispatch"]["inputs"]["publish"]["type"] == "boolean"
    assert on["workflow_dispatch"]["inputs"]["upload_vhd"]["type"] == "boolean"
    assert on["push"]["tags"]
    publish = _step_running(job, "./ik publish")
    assert "--distro" in publish["run"] and "--version" in publish["run"]


def test_permissions_are_read_only() -> None:
    wf = _workflow()
    assert wf["permissions"] == {"contents": "read"}
    assert all("permissions" not in job for job in wf["jobs"].values())
