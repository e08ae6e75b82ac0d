"""``invoke build``: base → provision + checks → undo test set-up → deprovision → shutdown → capture
(+ offline leak scan of the VHD) → verify boot → register.

::

    result = build("debian-12")           # or version="12.0.7"
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
from imagekit.capture import VHD_NAME, capture
from imagekit.config import distros
from imagekit.config.distros import Distro, Family, SourceKind
from imagekit.core.errors import BuildError, CheckFailed, ImagekitError
from imagekit.core.log import Timings, step
from imagekit.core.paths import REPO_ROOT, cache_dir
from imagekit.core.run import run
from imagekit.core.versions import Version
from imagekit.gallery import Gallery, ImageVersion
from imagekit.generalize.deprovision import DeprovisionReport, check_image, deprovision
from imagekit.scan.rules import Finding, ScanInput
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
    cpus: int = 1


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


def _check_summary(outcome: Any) -> list[dict[str, Any]]:
    return [{"id": r.check.id, "status": str(r.result.status.value if hasattr(r.result.status, "value")
                                             else r.result.status),
             "summary": r.result.summary, "seconds": round(r.seconds, 2)} for r in outcome.runs]


def _source(distro: Distro, base: Any, facts: dict[str, Any]) -> dict[str, Any]:
    """Where the image came from: the suite and archive state (Release file hashes) for a bootstrap, the
    image URL and its verified checksum for a download, with the installed package versions either way."""
    inputs = _base_meta(base).get("inputs", {})
    src = distro.source
    out: dict[str, Any] = {"kind": src.kind.value, "base_key": base.key}
    if src.kind is SourceKind.BOOTSTRAP:
        out.update(suite=src.suite, variant=src.variant, components=list(src.components),
                   archive=inputs.get("archive", {}), apt_sources=_base_meta(base).get("apt_sources"))
    else:
        out.update(url=src.url, checksum_url=src.checksum_url, image=inputs.get("image", {}))
    out["packages"] = facts["packages"]
    return out


def _base_meta(base: Any) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(Path(base.meta).read_text())
        return data
    except (OSError, json.JSONDecodeError):
        return {}


def _run_checks(pvm: Any, distro: Distro, plan: Any, report_dir: Path, what: str) -> Any:
    from imagekit.checkrun import check_provisioned

    outcome = check_provisioned(pvm, plan=plan, report_dir=report_dir)
    if not outcome.ok:
        bad = [f"{r.check.id}: {r.result.summary}" for r in outcome.runs if not r.result.ok]
        raise CheckFailed(f"{what}: {len(bad)} check(s) failed:\n" + "\n".join(f"  - {b}" for b in bad),
                          hint=f"evidence in {outcome.reports.get('html', report_dir)}")
    return outcome


def build(distro_id: str, options: BuildOptions | None = None) -> BuildResult:
    """Run the whole pipeline for ``distro_id`` and register the image; raises on any failure."""
    from imagekit.base import ensure_base
    from imagekit.provision.launch import provision
    from imagekit.provision.resource_setup import plan_for, resource_disk_custom_data, undo_test_setup

    opts = options or BuildOptions()
    d = distros.get(distro_id)
    gallery = opts.gallery or Gallery()
    version = Version.parse(opts.version) if opts.version else None
    if version is not None:
        gallery.reserve_check(d.id, version)  # fail before an hour of work, not after
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    report_dir = opts.report_dir or Path("reports") / f"build-{d.id}-{stamp}"
    workdir = opts.workdir or cache_dir() / "builds" / f"{d.id}-{stamp}"
    timings = Timings()
    t0 = time.monotonic()
    plan = plan_for(d)
    custom = resource_disk_custom_data(d)
    manifest: dict[str, Any] = {
        "distro": d.id, "distro_name": d.name, "distro_version": d.version, "family": d.family.value,
        "agent": {"provisioning": d.agent.value}, "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "toolkit": _toolkit_version(), "build_options": {"skip_deprovision": opts.skip_deprovision,
                                                         "skip_scan": opts.skip_scan},
    }
    log.info("building %s (%s)%s", d.id, d.name, f", version {version}" if version else "")
    with step("base image", timings):
        base = ensure_base(d)
    with gallery.staging() as staging:
        vm_timings: dict[str, Any] = {}
        with step("build VM (provision … capture)", timings), \
                provision(d, custom_data=custom, base_image=base.path, workdir=workdir, username=_username("build"),
                          memory_mib=opts.memory_mib, cpus=opts.cpus, name=f"{d.id}-build") as pvm:
            who = pvm.profile
            with step("build VM: checks", timings):
                outcome = _run_checks(pvm, d, plan, report_dir / "build", "build VM")
            facts = _guest_facts(pvm.guest, d)
            with step("undo test set-up", timings):
                undone = undo_test_setup(pvm.guest, d, plan)
            report: DeprovisionReport | None = None
            if opts.skip_deprovision:
                log.warning("TEST OPTION: deprovisioning skipped; this image must be caught")
                pvm.guest.run("sync")
            else:
                report = deprovision(pvm.guest, d, who.username, timings)
            pvm.guest.close()
            with step("shutdown (QMP powerdown)", timings):
                pvm.vm.shutdown(graceful=True)
                if pvm.vm.running():
                    raise BuildError(f"VM {pvm.vm.name} did not stop")
            overlay = pvm.vm.spec.os_disk if pvm.vm.spec is not None else None
            if overlay is None or not Path(overlay).exists():
                raise BuildError("the build VM's OS disk is gone before capture")
            scan_in = ScanInput(usernames=[who.username], hostnames=[who.hostname], password=who.password)

            scanned: list[list[Finding]] = []  # the scan's own result, for the manifest

            def scan(vhd: Path) -> None:
                if opts.skip_scan:
                    log.warning("TEST OPTION: offline scan skipped")
                    return
                scanned.append(check_image(vhd, "vpc", scan_in, timings))

            with step("capture", timings):
                artifacts = capture(Path(overlay), staging.path, timings, vhd_ready=scan)
            vm_timings["build_vm"] = pvm.timings.as_dict()
            build_user = {"username": who.username, "hostname": who.hostname, "vm_uuid": str(pvm.vm.vm_uuid)}
        with step("verify boot (new VM)", timings), \
                tempfile.TemporaryDirectory(prefix="ik-verify-") as vtmp:
            # Boot the artifact that goes to Azure: the fixed VHD itself, under a qcow2 layer (provision()
            # puts its overlay on a qcow2 base). The qcow2 artifact was compared equal to the same source.
            vhd_base = Path(vtmp) / "vhd-layer.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "vpc", "-b", (staging.path / VHD_NAME).resolve(),
                 vhd_base])
            try:
                with provision(d, custom_data=custom, base_image=vhd_base, workdir=workdir,
                               username=_username("verify"), memory_mib=opts.memory_mib, cpus=opts.cpus,
                               name=f"{d.id}-verify",
                               ready_timeout=VERIFY_READY_TIMEOUT, ssh_timeout=VERIFY_SSH_TIMEOUT) as pvm2:
                    with step("verify VM: checks", timings):
                        verify_outcome = _run_checks(pvm2, d, plan, report_dir / "verify", "verify VM")
                    who2 = pvm2.profile
                    verify_user = {"username": who2.username, "hostname": who2.hostname, "booted": VHD_NAME,
                                   "vm_uuid": str(pvm2.vm.vm_uuid)}
                    vm_timings["verify_vm"] = pvm2.timings.as_dict()
            except ImagekitError as exc:
                raise BuildError(f"the captured image did not provision again as a new VM, so it is not "
                                 f"registered:\n{exc}",
                                 hint="was it deprovisioned? (waagent -deprovision+user)") from exc
        for sub in ("build", "verify"):
            src = report_dir / sub / "report.json"
            if src.is_file():
                (staging.path / "checks").mkdir(exist_ok=True)
                shutil.copy2(src, staging.path / "checks" / f"{sub}.json")
        manifest.update({
            "source": _source(d, base, facts),
            "kernel": facts["kernel"],
            "agent": {"provisioning": d.agent.value, "versions": facts["agents"],
                      "waagent_conf": dict(d.waagent_conf)},
            "checks": {"build": _check_summary(outcome), "verify": _check_summary(verify_outcome)},
            "test_setup_undone": undone,
            "deprovision": report.as_dict() if report else {"skipped": True},
            "leak_scan": {"skipped": True} if opts.skip_scan else _scan_summary(scanned),
            "vms": {"build": build_user, "verify": verify_user},
            "artifacts": [a.as_dict() for a in artifacts],
        })
        with step("register", timings):
            timings.record("total (before register)", time.monotonic() - t0)
            manifest["timings"] = {"stages": timings.as_dict(), **vm_timings}
            image = gallery.register(d.id, staging, manifest, version, distro_version=d.version)
    final = image.manifest()
    log.info("registered %s %s at %s (%.0f s)", d.id, image.version, image.path, time.monotonic() - t0)
    (report_dir).mkdir(parents=True, exist_ok=True)
    (report_dir / "manifest.json").write_text(json.dumps(final, indent=2) + "\n")
    return BuildResult(image=image, manifest=final, timings=timings.as_dict(), report_dir=report_dir)
