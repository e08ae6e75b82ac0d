"""Checks run over SSH in a provisioned guest, and the reports they produce.

    from imagekit.checks import CheckContext, run_checks, write_reports
    ctx = CheckContext(guest=vm.guest, distro=distro, profile=vm.profile, fabric=record, plan=plan)
    runs = run_checks(ctx)                 # every applicable check; one failure never stops the others
    write_reports(runs, report_dir, meta)  # junit.xml, report.json, report.html
    print(summary_table(runs))

The resource-disk test set-up (each agent's own resource-disk code run against the attached disk under
QEMU, and its undo before deprovisioning) is :mod:`imagekit.provision.resource_setup`.
"""

from imagekit.checks.registry import (
    Check,
    CheckContext,
    CheckResult,
    CheckRun,
    FabricRecord,
    HealthReport,
    RecordedFabric,
    Status,
    overall_ok,
)
from imagekit.checks.report import RunInfo, summary_table, write_reports
from imagekit.checks.runner import catalogue, run_checks, select
from imagekit.provision.resource_setup import (
    RESOURCE_DISK,
    ResourceDiskPlan,
    activate_resource_disk,
    install_waagent_shim,
    plan_for,
    resource_disk_custom_data,
    undo_test_setup,
)

__all__ = [
    "RESOURCE_DISK",
    "Check",
    "CheckContext",
    "CheckResult",
    "CheckRun",
    "FabricRecord",
    "HealthReport",
    "RecordedFabric",
    "ResourceDiskPlan",
    "RunInfo",
    "Status",
    "activate_resource_disk",
    "catalogue",
    "install_waagent_shim",
    "overall_ok",
    "plan_for",
    "resource_disk_custom_data",
    "run_checks",
    "select",
    "summary_table",
    "undo_test_setup",
    "write_reports",
]
