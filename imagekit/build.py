"""``invoke build``: base → provision + checks → undo test set-up → deprovision → shutdown → capture
(+ offline leak scan of the VHD) → verify boot → register.

::

    result = build(distros.get("debian-12"))   # or BuildOptions(version="12.0.7")
    print(result.version, result.path)

Only an image that provisions again is registered. The verify boot starts the captured image as a new VM —
a new VM UUID, a different user name, SSH key and hostname — through the emulated platform and runs the
checks again. An image that was not deprovisioned fails there the way it would fail on Azure: waagent finds
its old ``/var/lib/waagent/provisioned`` marker, sees only that the VM id changed, reports Ready and never
creates the new user, so the login never works (azure-platform.md §2, step 1).

Everything a build writes goes to a staging directory of the gallery (:mod:`imagekit.gallery`); a failure or
Ctrl-C at any point removes it and registers nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagekit
from imagekit.base import ensure_base
from imagekit.base.inputs import BaseImage
from imagekit.capture import VHD_NAME, Artifact, PendingCapture, start_capture
from imagekit.checkrun import CheckOutcome, check_provisioned
from imagekit.config.distros import Distro, Family, SourceKind
from imagekit.core.errors import BuildError, CheckFailed, ImagekitError
from imagekit.core.log import Timings, step
from imagekit.core.paths import REPO_ROOT, cache_dir
from imagekit.core.run import run
from imagekit.core.versions import Version
from imagekit.gallery import Gallery, ImageVersion, Staging
from imagekit.generalize import DeprovisionReport, deprovision
from imagekit.provision import ProvisionedVM, provision
from imagekit.provision.resource_setup import (
    ResourceDiskPlan,
    plan_for,
    resource_disk_custom_data,
    undo_test_setup,
)
from imagekit.scan import Finding, ScanInput, check_image
from imagekit.vm.guest import Guest

log = logging.getLogger(__name__)

VERIFY_READY_TIMEOUT = 420.0
VERIFY_SSH_TIMEOUT = 240.0


@dataclass
class BuildOptions:
    version: str | None = None
    skip_deprovision: bool = False  # test option: capture a provisioned-but-not-deprovisioned disk
    skip_scan: bool = False  # test option: let a leaking image through to the verify boot
    report_dir: Path | None = None
    workdir: Path | None = None
    gallery: Gallery | None = None
    memory_mib: int = 1024
    cpus: int | None = None  # None: chosen from what the host has free (qemu.choose_cpus)


@dataclass
class BuildResult:
    image: ImageVersion
    manifest: dict[str, Any]
    timings: dict[str, float]
    report_dir: Path

    @property
    def version(self) -> str:
        return str(self.image.version)

    @property
    def path(self) -> Path:
        return self.image.path


@dataclass
class _Plan:
    """What every phase of one build works from, settled before any work starts."""

    distro: Distro
    opts: BuildOptions
    gallery: Gallery
    version: Version | None  # None: the gallery's default numbering
    report_dir: Path
    workdir: Path
    resource_plan: ResourceDiskPlan  # what both VMs' resource disks are set up with, and checked against
    custom_data: bytes | None  # the CustomData made from resource_plan
    manifest_head: dict[str, Any]  # what the manifest knows before the build
    timings: Timings
    started: float  # time.monotonic() when the build started


@dataclass
class _Generalized:
    """What the build VM did between provisioning and shutdown."""

    outcome: CheckOutcome
    facts: dict[str, Any]
    undone: list[str]
    deprovision: DeprovisionReport | None  # None: skipped (test option)


@dataclass
class _BuildVM:
    """The build VM's result: the captured artifacts and what the manifest records of the VM."""

    generalized: _Generalized
    scanned: list[list[Finding]]  # the offline scan's own result; empty when it did not run
    pending: PendingCapture  # both artifacts written; their SHA-256 runs on beside the verify boot
    vm: dict[str, str]
    timings: dict[str, float]


@dataclass
class _VerifyVM:
    """The verify VM's result: the captured image provisioned again as a new VM."""

    outcome: CheckOutcome
    vm: dict[str, str]
    timings: dict[str, float]


def default_build_report_dir(distro_id: str, stamp: str | None = None) -> Path:
    """``reports/build-<distro>-<UTC time>/``: where a build's reports go unless told otherwise."""
    stamp = stamp or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path("reports") / f"build-{distro_id}-{stamp}"


def _username(role: str) -> str:
    """A fresh user name for the next VM, e.g. ``ikb3fa9c1`` (build) or ``ikv07d2e4`` (verify)."""
    return f"ik{role[0]}{secrets.token_hex(3)}"


def _toolkit_version() -> dict[str, str]:
    out = {"imagekit": imagekit.__version__}
    if (REPO_ROOT / ".git").exists():
        res = run(["git", "-C", REPO_ROOT, "describe", "--always", "--dirty", "--abbrev=12"], check=False)
        if res.returncode == 0:
            out["git"] = res.stdout.strip()
    res = run(["qemu-img", "--version"], check=False)
    out["qemu-img"] = res.stdout.splitlines()[0] if res.stdout else ""
    return out


def _guest_facts(guest: Guest, distro: Distro) -> dict[str, Any]:
    """Kernel, agent versions and the installed packages, read in the guest before it is generalized."""
    def out(cmd: str) -> str:
        res = guest.run(cmd, sudo=True)
        if not res.ok:
            raise BuildError(f"reading build facts from the guest failed:\n{res.evidence(1500)}")
        return res.stdout.strip()

    facts: dict[str, Any] = {"kernel": out("uname -r")}
    if distro.family in (Family.DEBIAN, Family.UBUNTU):
        listing = out("dpkg-query -W -f '${db:Status-Abbrev}\\t${Package}\\t${Version}\\n'")
        pkgs = {p: v for st, p, v in (line.split("\t") for line in listing.splitlines()) if st.startswith("ii")}
    else:
        listing = out("rpm -qa --qf '%{NAME}\\t%{VERSION}-%{RELEASE}\\n'")
        pkgs = dict(line.split("\t", 1) for line in listing.splitlines())
    facts["packages"] = dict(sorted(pkgs.items()))
    agents: dict[str, str] = {}
    wa = guest.run("waagent --version 2>&1 | head -n1")
    if wa.ok and wa.stdout.strip():
        agents["waagent"] = wa.stdout.strip()
    ci = guest.run("cloud-init --version 2>&1")
    if ci.ok and ci.stdout.strip():
        agents["cloud-init"] = ci.stdout.strip()
    facts["agents"] = agents
    return facts


def _scan_summary(scanned: list[list[Finding]]) -> dict[str, Any]:
    """The offline scan's own result for the manifest; a scan that never ran is not recorded as clean."""
    if len(scanned) != 1:
        raise BuildError(f"the offline leak scan ran {len(scanned)} times (once expected), so the image is not "
                         "registered")
    return {"findings": len(scanned[0]), "artifact": VHD_NAME}


def _check_summary(outcome: CheckOutcome) -> list[dict[str, Any]]:
    return [{"id": r.check.id, "status": r.result.status.value, "summary": r.result.summary,
             "seconds": round(r.seconds, 2)} for r in outcome.runs]


def _source(distro: Distro, base: BaseImage, facts: dict[str, Any]) -> dict[str, Any]:
    """Where the image came from: the suite and archive state (Release file hashes) for a bootstrap, the
    image URL and its verified checksum for a download, with the installed package versions either way."""
    meta = _base_meta(base)
    inputs = meta.get("inputs", {})
    src = distro.source
    out: dict[str, Any] = {"kind": src.kind.value, "base_key": base.key}
    if src.kind is SourceKind.BOOTSTRAP:
        out.update(suite=src.suite, variant=src.variant, components=list(src.components),
                   archive=inputs.get("archive", {}), apt_sources=meta.get("apt_sources"))
    else:
        out.update(url=src.url, checksum_url=src.checksum_url, image=inputs.get("image", {}))
    out["packages"] = facts["packages"]
    return out


def _base_meta(base: BaseImage) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(base.meta.read_text())
        return data
    except (OSError, json.JSONDecodeError):
        return {}


def _run_checks(pvm: ProvisionedVM, plan: ResourceDiskPlan, report_dir: Path, what: str) -> CheckOutcome:
    outcome = check_provisioned(pvm, plan=plan, report_dir=report_dir)
    if not outcome.ok:
        bad = [f"{r.check.id}: {r.result.summary}" for r in outcome.runs if not r.result.ok]
        raise CheckFailed(f"{what}: {len(bad)} check(s) failed:\n" + "\n".join(f"  - {b}" for b in bad),
                          hint=f"evidence in {outcome.reports.get('html', report_dir)}")
    return outcome


def build(distro: Distro, options: BuildOptions | None = None) -> BuildResult:
    """Run the whole pipeline for ``distro`` and register the image; raises on any failure."""
    plan = _plan(distro, options or BuildOptions())
    base = _base_image(plan)
    with plan.gallery.staging() as staging:
        built = _build_vm(plan, base, staging)
        try:
            verified = _verify_vm(plan, staging)
            artifacts = built.pending.finish()
        except BaseException:
            built.pending.abort()
            raise
        _keep_check_reports(plan.report_dir, staging)
        manifest = _manifest(plan, base, built, verified, artifacts)
        image = _register(plan, staging, manifest, {"build_vm": built.timings, "verify_vm": verified.timings})
    return _finish(plan, image)


# -- plan ---------------------------------------------------------------------------------------------------


def _plan(d: Distro, opts: BuildOptions) -> _Plan:
    """Options, the version reservation (before an hour of work, not after), report/work dirs, manifest head."""
    gallery = opts.gallery or Gallery()
    version = Version.parse(opts.version) if opts.version else None
    if version is not None:
        gallery.reserve_check(d.id, version)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    report_dir = opts.report_dir or default_build_report_dir(d.id, stamp)
    workdir = opts.workdir or cache_dir() / "builds" / f"{d.id}-{stamp}"
    timings = Timings()
    started = time.monotonic()
    resource_plan = plan_for(d)
    custom_data = resource_disk_custom_data(d)
    head = _manifest_head(d, opts)
    log.info("building %s (%s)%s", d.id, d.name, f", version {version}" if version else "")
    return _Plan(distro=d, opts=opts, gallery=gallery, version=version, report_dir=report_dir, workdir=workdir,
                 resource_plan=resource_plan, custom_data=custom_data, manifest_head=head, timings=timings,
                 started=started)


def _manifest_head(d: Distro, opts: BuildOptions) -> dict[str, Any]:
    return {
        "distro": d.id, "distro_name": d.name, "distro_version": d.version, "family": d.family.value,
        "agent": {"provisioning": d.agent.value}, "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "toolkit": _toolkit_version(), "build_options": {"skip_deprovision": opts.skip_deprovision,
                                                         "skip_scan": opts.skip_scan},
    }


# -- base image ---------------------------------------------------------------------------------------------


def _base_image(plan: _Plan) -> BaseImage:
    with step("base image", plan.timings):
        return ensure_base(plan.distro)


# -- build VM: provision, checks, facts, undo test set-up, deprovision, shutdown, capture + offline scan ------


def _build_vm(plan: _Plan, base: BaseImage, staging: Staging) -> _BuildVM:
    d, opts = plan.distro, plan.opts
    pending: PendingCapture | None = None
    try:
        with step("build VM (provision … capture)", plan.timings), \
                provision(d, custom_data=plan.custom_data, base_image=base.path, workdir=plan.workdir,
                          username=_username("build"), memory_mib=opts.memory_mib, cpus=opts.cpus,
                          name=f"{d.id}-build") as pvm:
            generalized = _check_and_generalize(plan, pvm)
            overlay = _shut_down(plan, pvm)
            scanned, pending = _capture(plan, pvm, overlay, staging)
            who = pvm.profile
            return _BuildVM(generalized=generalized, scanned=scanned, pending=pending,
                            vm={"username": who.username, "hostname": who.hostname, "vm_uuid": str(pvm.vm.vm_uuid)},
                            timings=pvm.timings.as_dict())
    except BaseException:
        if pending is not None:  # the VM's teardown failed after the capture: stop the hashing too
            pending.abort()
        raise


def _check_and_generalize(plan: _Plan, pvm: ProvisionedVM) -> _Generalized:
    """Checks, the build facts, undoing the test set-up, and deprovisioning (unless a test skips it)."""
    d, timings = plan.distro, plan.timings
    with step("build VM: checks", timings):
        outcome = _run_checks(pvm, plan.resource_plan, plan.report_dir / "build", "build VM")
    facts = _guest_facts(pvm.guest, d)
    with step("undo test set-up", timings):
        undone = undo_test_setup(pvm.guest, d, plan.resource_plan)
    report: DeprovisionReport | None = None
    if plan.opts.skip_deprovision:
        log.warning("TEST OPTION: deprovisioning skipped; this image must be caught")
        pvm.guest.run("sync")
    else:
        report = deprovision(pvm.guest, d, pvm.profile.username, timings)
    return _Generalized(outcome=outcome, facts=facts, undone=undone, deprovision=report)


def _shut_down(plan: _Plan, pvm: ProvisionedVM) -> Path:
    """Power the build VM down; returns its OS disk (the overlay to capture)."""
    pvm.guest.close()
    with step("shutdown (QMP powerdown)", plan.timings):
        pvm.vm.shutdown(graceful=True)
        if pvm.vm.running():
            raise BuildError(f"VM {pvm.vm.name} did not stop")
    overlay = pvm.vm.spec.os_disk if pvm.vm.spec is not None else None
    if overlay is None or not Path(overlay).exists():
        raise BuildError("the build VM's OS disk is gone before capture")
    return Path(overlay)


def _capture(plan: _Plan, pvm: ProvisionedVM, overlay: Path,
             staging: Staging) -> tuple[list[list[Finding]], PendingCapture]:
    """Capture into the staging directory, the VHD scanned offline for what the build VM left behind; the
    artifacts' SHA-256 goes on in the background (the verify boot does not wait for it)."""
    who = pvm.profile
    scan_in = ScanInput(usernames=[who.username], hostnames=[who.hostname], password=who.password)
    scanned: list[list[Finding]] = []  # the scan's own result, for the manifest

    def scan(vhd: Path) -> None:
        if plan.opts.skip_scan:
            log.warning("TEST OPTION: offline scan skipped")
            return
        scanned.append(check_image(vhd, "vpc", scan_in, plan.timings))

    with step("capture", plan.timings):
        pending = start_capture(overlay, staging.path, plan.timings, vhd_ready=scan)
    return scanned, pending


# -- verify VM: the captured VHD booted as a new VM, checks ---------------------------------------------------


def _verify_vm(plan: _Plan, staging: Staging) -> _VerifyVM:
    with step("verify boot (new VM)", plan.timings), \
            tempfile.TemporaryDirectory(prefix="ik-verify-") as vtmp:
        # Boot the artifact that goes to Azure: the fixed VHD itself, under a qcow2 layer (provision()
        # puts its overlay on a qcow2 base). The qcow2 artifact was compared equal to the same source.
        vhd_base = Path(vtmp) / "vhd-layer.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "vpc", "-b", (staging.path / VHD_NAME).resolve(),
             vhd_base])
        try:
            return _boot_and_check(plan, vhd_base)
        except ImagekitError as exc:
            raise BuildError(f"the captured image did not provision again as a new VM, so it is not "
                             f"registered:\n{exc}",
                             hint="was it deprovisioned? (waagent -deprovision+user)") from exc


def _boot_and_check(plan: _Plan, vhd_base: Path) -> _VerifyVM:
    d, opts = plan.distro, plan.opts
    with provision(d, custom_data=plan.custom_data, base_image=vhd_base, workdir=plan.workdir,
                   username=_username("verify"), memory_mib=opts.memory_mib, cpus=opts.cpus,
                   name=f"{d.id}-verify",
                   ready_timeout=VERIFY_READY_TIMEOUT, ssh_timeout=VERIFY_SSH_TIMEOUT) as pvm:
        with step("verify VM: checks", plan.timings):
            outcome = _run_checks(pvm, plan.resource_plan, plan.report_dir / "verify", "verify VM")
        who = pvm.profile
        return _VerifyVM(outcome=outcome,
                         vm={"username": who.username, "hostname": who.hostname, "booted": VHD_NAME,
                             "vm_uuid": str(pvm.vm.vm_uuid)},
                         timings=pvm.timings.as_dict())


# -- manifest, register ---------------------------------------------------------------------------------------


def _keep_check_reports(report_dir: Path, staging: Staging) -> None:
    """Both VMs' check reports go with the image, as ``checks/build.json`` and ``checks/verify.json``."""
    for sub in ("build", "verify"):
        src = report_dir / sub / "report.json"
        if src.is_file():
            (staging.path / "checks").mkdir(exist_ok=True)
            shutil.copy2(src, staging.path / "checks" / f"{sub}.json")


def _manifest(plan: _Plan, base: BaseImage, built: _BuildVM, verified: _VerifyVM,
              artifacts: list[Artifact]) -> dict[str, Any]:
    d, gen = plan.distro, built.generalized
    manifest = dict(plan.manifest_head)
    manifest.update({
        "source": _source(d, base, gen.facts),
        "kernel": gen.facts["kernel"],
        "agent": {"provisioning": d.agent.value, "versions": gen.facts["agents"],
                  "waagent_conf": dict(d.waagent_conf)},
        "checks": {"build": _check_summary(gen.outcome), "verify": _check_summary(verified.outcome)},
        "test_setup_undone": gen.undone,
        "deprovision": gen.deprovision.as_dict() if gen.deprovision else {"skipped": True},
        "leak_scan": {"skipped": True} if plan.opts.skip_scan else _scan_summary(built.scanned),
        "vms": {"build": built.vm, "verify": verified.vm},
        "artifacts": [a.as_dict() for a in artifacts],
    })
    return manifest


def _register(plan: _Plan, staging: Staging, manifest: dict[str, Any],
              vm_timings: dict[str, dict[str, float]]) -> ImageVersion:
    d = plan.distro
    with step("register", plan.timings):
        plan.timings.record("total (before register)", time.monotonic() - plan.started)
        manifest = {**manifest, "timings": {"stages": plan.timings.as_dict(), **vm_timings}}
        return plan.gallery.register(d.id, staging, manifest, plan.version, distro_version=d.version)


def _finish(plan: _Plan, image: ImageVersion) -> BuildResult:
    """The registered manifest also goes to the report directory."""
    final = image.manifest()
    log.info("registered %s %s at %s (%.0f s)", plan.distro.id, image.version, image.path,
             time.monotonic() - plan.started)
    plan.report_dir.mkdir(parents=True, exist_ok=True)
    (plan.report_dir / "manifest.json").write_text(json.dumps(final, indent=2) + "\n")
    return BuildResult(image=image, manifest=final, timings=plan.timings.as_dict(), report_dir=plan.report_dir)
