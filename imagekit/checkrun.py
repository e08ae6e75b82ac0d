"""The ``check`` stage: a provisioned VM → resource-disk set-up → checks → reports.

    with provision(distro, custom_data=resource_disk_custom_data(distro)) as pvm:
        outcome = check_provisioned(pvm, report_dir=Path("reports/x"))
        ...                                   # the build pipeline deprovisions here, after:
        undo_test_setup(pvm.guest, distro)    # what the set-up changed outside /run

:func:`check_distro` does the whole thing (what ``invoke check`` runs).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from imagekit.checks.registry import (
    Check,
    CheckContext,
    CheckRun,
    HealthReport,
    RecordedFabric,
    overall_ok,
)
from imagekit.checks.report import Phase, RunInfo, default_report_dir, write_reports
from imagekit.checks.runner import run_checks
from imagekit.config.distros import Distro
from imagekit.config.profile import ProvisioningProfile
from imagekit.core.log import Timings, step
from imagekit.provision.resource_setup import (
    ResourceDiskPlan,
    activate_resource_disk,
    plan_for,
    resource_disk_custom_data,
)
from imagekit.vm.guest import Guest

log = logging.getLogger(__name__)


class _Reports(Protocol):
    def reports(self) -> Sequence[Any]: ...


def fabric_record(fabric: _Reports, t0: float | None = None) -> RecordedFabric:
    """The fabric emulator's health reports as the checks read them (``at`` made relative to ``t0``)."""
    out = []
    for r in fabric.reports():
        at = getattr(r, "at", None)
        out.append(HealthReport(state=r.state, substatus=r.substatus or "", description=r.description or "",
                                seconds=round(at - t0, 1) if at is not None and t0 is not None else None))
    return RecordedFabric(tuple(out))


# What happens in the span that ends at each milestone the runner and this stage record.
PHASE_LABELS = {
    "first console output": "QEMU start-up until the firmware's first output",
    "boot loader": "firmware (SeaBIOS) until the boot loader",
    "kernel started": "boot loader: menu, loading the kernel and initrd",
    "initrd started": "kernel start-up",
    "userspace started": "initrd: drivers and the root file system",
    "agent started": "userspace (systemd) until the agent starts",
    "login prompt": "until the login prompt on the serial console",
    "ready": "until the agent reported Ready",
    "host keys on console": "cloud-init config and final stages",
    "ssh ready": "SSH login as the provisioned user",
    "resource disk handled": "resource disk: the agent's own code",
    "checks done": "checks over SSH",
}


def timeline(timings: Mapping[str, float]) -> tuple[list[Phase], list[tuple[str, float]]]:
    """Phases and milestones from a provisioned VM's timings.

    ``qemu start`` is a duration (launch until QEMU runs); every other entry is a moment in seconds after
    QEMU started. The phases are the spans between consecutive moments.
    """
    phases: list[Phase] = []
    events = sorted(((n, float(t)) for n, t in timings.items() if n != "qemu start"), key=lambda e: e[1])
    if "qemu start" in timings:
        phases.append(Phase("launch QEMU", -float(timings["qemu start"]), 0.0))
    prev_name, prev_t = "QEMU started", 0.0
    for name, t in events:
        label = PHASE_LABELS.get(name, f"{prev_name} → {name}")
        phases.append(Phase(label, prev_t, t))
        prev_name, prev_t = name, t
    return phases, events


class _ProvisionedVM(Protocol):
    """What :func:`check_provisioned` needs of :class:`imagekit.provision.launch.ProvisionedVM`."""

    distro: Distro
    guest: Any
    fabric: Any
    profile: ProvisioningProfile
    timings: Timings
    console_log: Path
    vm: Any


@dataclass
class CheckOutcome:
    runs: list[CheckRun]
    info: RunInfo
    reports: dict[str, Path]

    @property
    def ok(self) -> bool:
        return overall_ok(self.runs)


def check_provisioned(
    pvm: _ProvisionedVM,
    *,
    plan: ResourceDiskPlan | None = None,
    report_dir: Path | None = None,
    checks: Sequence[Check] | None = None,
    settle_timeout: float = 300.0,
) -> CheckOutcome:
    """Run the resource-disk set-up and the checks in a provisioned VM, and write the reports.

    ``plan`` must describe what the VM was provisioned with (for cloud-init: the plan the CustomData was
    made from); by default :func:`plan_for` the distro, which matches ``resource_disk_custom_data(distro)``.
    """
    distro = pvm.distro
    plan = plan or plan_for(distro)
    started = datetime.now(UTC)
    guest: Guest = pvm.guest
    mark = getattr(pvm.vm, "mark", None)
    # Step durations go to their own Timings: the VM's timings hold moments (seconds after QEMU started).
    steps = Timings()
    with step("Letting the agent handle the resource disk", steps):
        facts = activate_resource_disk(guest, plan, timeout=settle_timeout)
    if mark:
        mark("resource disk handled")
    ctx = CheckContext(guest=guest, distro=distro, profile=pvm.profile,
                      fabric=fabric_record(pvm.fabric, getattr(pvm.vm, "t_qemu", None)), plan=plan, facts=facts)
    with step("Running checks", steps):
        runs = run_checks(ctx, checks)
    if mark:
        mark("checks done")
    phases, events = timeline(pvm.timings.as_dict())
    facts.update({
        "host_key_source": getattr(pvm, "host_key_source", ""),
        "provision_notes": list(getattr(pvm, "notes", []) or []),
        "timings": pvm.timings.as_dict(),
        "check_stage_seconds": steps.as_dict(),
        "run_dir": str(getattr(pvm, "run_dir", "")),
    })
    info = RunInfo(distro=distro.id, agent=distro.agent.value, started=started, finished=datetime.now(UTC),
                   phases=phases, events=events, facts=facts, console_log=str(pvm.console_log))
    out_dir = report_dir or default_report_dir(distro.id)
    secrets = [s for s in (pvm.profile.password,) if s]
    paths = write_reports(runs, out_dir, info, secrets=secrets)
    return CheckOutcome(runs, info, paths)


def check_distro(
    distro: Distro,
    *,
    report_dir: Path | None = None,
    swap_percent: int | None = None,
    checks: Sequence[Check] | None = None,
    keep: bool = False,
    profile: ProvisioningProfile | None = None,
    **provision_options: Any,
) -> CheckOutcome:
    """Provision a throwaway VM of ``distro`` (with the resource-disk CustomData for cloud-init images),
    run the checks, write the reports, tear the VM down. A given ``profile`` gets that CustomData too."""
    from imagekit.provision.launch import provision

    plan = plan_for(distro, swap_percent=swap_percent)
    custom = resource_disk_custom_data(distro, swap_percent=swap_percent)
    if profile is not None and custom is not None:
        # provision() uses custom_data only for the profile it makes itself.
        profile = dataclasses.replace(profile, custom_data=custom)
    start = time.monotonic()
    with provision(distro, profile=profile, custom_data=custom, keep=keep, **provision_options) as pvm:
        outcome = check_provisioned(pvm, plan=plan, report_dir=report_dir, checks=checks)
    log.info("check run for %s took %.1f s", distro.id, time.monotonic() - start)
    return outcome
