"""``invoke matrix``: every selected distro of the table built (or provisioned and checked) side by side, one
isolated child process per distro, with one combined report.

    plan = plan_matrix(["debian-12", "debian-13"], jobs=None)     # selection, parallelism, vCPUs per VM
    outcomes = run_matrix(plan, MatrixOptions(report_dir=Path("reports/m")))
    merge_reports([Path("reports/m")], Path("reports/m"))         # junit.xml, summary.json, index.html

Each distro runs as its own ``invoke build`` (or ``invoke check``) process — its own network namespace,
fabric, run directory and gallery staging — so a failure or Ctrl-C in one never touches another's files. The
child writes ``result.json`` beside its reports (:mod:`imagekit.matrix.result`); the combined report is made
from those files only, which is also what ``invoke matrix --merge`` does with the report directories that CI
jobs upload.
"""

from imagekit.matrix.plan import MatrixPlan, github_matrix, list_rows, plan_matrix, select
from imagekit.matrix.report import merge_reports
from imagekit.matrix.result import Status, recording_result
from imagekit.matrix.run import MatrixOptions, Outcome, run_matrix

__all__ = ["MatrixOptions", "MatrixPlan", "Outcome", "Status", "github_matrix", "list_rows", "merge_reports",
           "plan_matrix", "recording_result", "run_matrix", "select"]
