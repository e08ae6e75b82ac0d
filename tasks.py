"""imagekit's Invoke tasks: each parses its options, calls the library, prints. Nothing else lives here.

Run them through ./ik (which sets up first) or .venv/bin/invoke once set up.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from imagekit.core.errors import ImagekitError
from imagekit.core.log import setup_logging

F = TypeVar("F", bound=Callable[..., Any])


def _cli(fn: F) -> F:
    """Turn toolkit errors into a message and exit code 1, Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging(verbose=bool(kwargs.get("verbose")))
        try:
            return fn(*args, **kwargs)
        except ImagekitError as exc:
            raise Exit(f"imagekit: error: {exc}", code=1) from exc
        except KeyboardInterrupt:
            print("imagekit: interrupted; cleaned up", file=sys.stderr)
            raise Exit(code=130) from None
        except BrokenPipeError:
            # The reader went away (`./ik distros | head`): no traceback; stdout goes nowhere from now on,
            # so the interpreter's final flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise Exit(code=141) from None

    return wrapper  # type: ignore[return-value]


def _vm_size(memory: int, cpus: int) -> int | None:
    """--memory and --cpus checked before any work; the vCPU count to pass on (None: chosen from the host)."""
    from imagekit.core.errors import InputError
    from imagekit.vm.qemu import CPUS_MAX, MEMORY_MIB_MAX, MEMORY_MIB_MIN

    if not MEMORY_MIB_MIN <= memory <= MEMORY_MIB_MAX:
        raise InputError(f"--memory: bad guest memory {memory} MiB; allowed: {MEMORY_MIB_MIN} to {MEMORY_MIB_MAX} "
                         "(MiB)")
    if not 0 <= cpus <= CPUS_MAX:
        raise InputError(f"--cpus: bad vCPU count {cpus}; allowed: 1 to {CPUS_MAX}, or 0 to choose from the host's "
                         "free cores")
    return cpus or None


# --- distro table -------------------------------------------------------------------------------


@task(help={
    "json": "print a JSON list instead, one object per distro (id, family, version, agent, source, buildable, "
            "why), e.g. for a CI matrix",
    "buildable": "only the distros this machine can build",
    "verbose": "log debug detail",
})
@_cli
def distros(c: Context, json: bool = False, buildable: bool = False, verbose: bool = False) -> None:
    """Print the distro table: id, agent, image source, and whether it can be built on this machine."""
    import json as json_mod

    from imagekit.config import distros as table

    entries = []
    for d in table.default_table().values():
        ok, why = d.buildable_here()
        if ok or not buildable:
            entries.append((d, ok, why))
    if json:
        print(json_mod.dumps([{"id": d.id, "family": d.family.value, "version": d.version, "agent": d.agent.value,
                               "source": d.source.kind.value, "buildable": ok, "why": why}
                              for d, ok, why in entries], indent=1))
        return
    rows = [("ID", "AGENT", "SOURCE", "BUILDS HERE")]
    rows += [(d.id, d.agent.value, d.source.kind.value, ("yes: " if ok else "no: ") + why) for d, ok, why in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])


# --- OVF provisioning ISO (issue: foundation) -----------------------------------------------------


@task(
    help={
        "hostname": "the VM's host name (Azure's computerName rules: 1-64 of A-Z a-z 0-9 . -)",
        "username": "the admin user to create (Azure's adminUsername rules; root, admin, ... are refused)",
        "ssh_key": "an OpenSSH public key file (.pub; RSA >= 2048 bits or Ed25519); repeat for more keys",
        "password_file": "a file whose first line is the user's password; later lines are ignored (at most "
                         "4 KiB; kept out of logs and errors)",
        "custom_data": "a file passed as CustomData (cloud-config, script, ...; at most 65535 bytes, checked "
                       "before it is read)",
        "disable_password_auth": "disable SSH password authentication (default; --no-... enables it)",
        "output": "the ISO file to write, in an existing directory (written 0600, atomically; nothing is left on "
                  "error). A directory or a path ending in / is refused: name the file, e.g. out/ovf.iso",
        "verbose": "log debug detail",
    },
    iterable=["ssh_key"],
)
@_cli
def iso(
    c: Context,
    hostname: str = "",
    username: str = "",
    ssh_key: list[str] | None = None,
    password_file: str | None = None,
    custom_data: str | None = None,
    disable_password_auth: bool = True,
    output: str = "",
    verbose: bool = False,
) -> None:
    """Write an OVF provisioning ISO (ovf-env.xml on ISO9660+Joliet+Rock Ridge+UDF) that Azure's agents read."""
    from imagekit.config.profile import ProvisioningProfile
    from imagekit.media.iso import check_output_path, write_ovf_iso

    missing = [f"--{n}" for n, v in (("hostname", hostname), ("username", username), ("output", output)) if not v]
    if missing:
        raise ImagekitError(f"missing required option(s): {', '.join(missing)}", hint="see: invoke --help iso")
    check_output_path(output)  # before any input file is read (write_ovf_iso checks again)
    profile = ProvisioningProfile.from_files(
        hostname=hostname,
        username=username,
        ssh_key_files=ssh_key or [],
        password_file=password_file,
        custom_data_file=custom_data,
        disable_password_auth=disable_password_auth,
    )
    path = write_ovf_iso(profile, output)
    print(path)
# --- base images --------------------------------------------------------------------------------
@task(help={
    "distro": "distro id from the table (invoke distros lists them), e.g. debian-12",
    "rebuild": "build again even if an image with the same inputs is cached",
    "prune": "afterwards remove this distro's older cached images (not those a process has open)",
    "verbose": "log debug detail (every command run)",
})
@_cli
def base(c: Context, distro: str = "debian-12", rebuild: bool = False, prune: bool = False,
         verbose: bool = False) -> None:
    """Build (or find in the cache) the distro's base image; print its path on the last line.

    The image is read-only: put a qcow2 overlay on it, never write to it.
    """
    from imagekit import base as base_images
    from imagekit.config import distros as table

    img = base_images.ensure_base(table.get(distro), rebuild=rebuild)
    if prune:
        for old in base_images.prune(img.distro_id):
            print(f"removed {old}")
    print(f"{img.distro_id}: kernel {img.kernel}, {len(img.packages)} packages, "
          f"{'cached' if img.cached else 'built'}; meta {img.meta}")
    print(img.path)


# --- provisioning on the local platform --------------------------------------------------------
@task(help={
    "distro": "distro id from the table (invoke distros lists them), e.g. debian-12",
    "keep": "leave the VM running afterwards and print how to log in (its emulated fabric keeps serving it "
            "from a detached process until the VM exits)",
    "custom_data": "a file passed to the VM as CustomData (cloud-config, script; at most 65535 bytes, checked "
                   "before it is read)",
    "workdir": "where the run directory (console log, QEMU and namespace logs) goes (default: the cache)",
    "memory": "guest memory in MiB",
    "cpus": "virtual CPUs (default 0: two where two host cores are free of other imagekit VMs, else one)",
    "verbose": "log debug detail (every command run)",
})
@_cli
def provision(c: Context, distro: str = "debian-12", keep: bool = False, custom_data: str = "",
              workdir: str = "", memory: int = 1024, cpus: int = 0, verbose: bool = False) -> None:
    """Boot the distro's base image as a throwaway VM, let its agent provision it, log in over SSH.

    Ends when the agent reported Ready to the emulated fabric and SSH login works (or fails with why).
    """
    from pathlib import Path

    from imagekit.config import distros as table
    from imagekit.config.profile import CUSTOM_DATA_MAX, read_input_file, validate_custom_data
    from imagekit.provision.launch import provision as provision_vm

    d = table.get(distro)
    data = None
    if custom_data:
        data = read_input_file(Path(custom_data), "--custom-data", CUSTOM_DATA_MAX,
                               f"a file of 1-{CUSTOM_DATA_MAX} bytes (Azure's CustomData limit)")
        validate_custom_data(data)
    with provision_vm(d, custom_data=data, keep=keep, workdir=Path(workdir) if workdir else None,
                      memory_mib=memory, cpus=_vm_size(memory, cpus)) as pvm:
        who = pvm.guest.run("id -un; hostname; systemd-detect-virt", sudo=False).stdout.split()
        print(f"{pvm.vm.name}: provisioned by {pvm.distro.agent.value}; logged in as {' '.join(who[:1])} "
              f"on {' '.join(who[1:2])} ({' '.join(who[2:3])})")
        print("timings (s after QEMU start): " + ", ".join(f"{k} {v:.1f}" for k, v in pvm.timings.as_dict().items()))
        print(f"console log: {pvm.console_log}")
    if pvm.kept:
        print("the VM keeps running; log in with:")
        print(f"  {pvm.ssh_command()}")
        print(f"stop it with:  ./ik vm-stop --name {pvm.vm.name}   (./ik vms lists kept VMs)")
        if pvm.fabric_keeper is not None:
            print(f"(its fabric is served by process {pvm.fabric_keeper.pid}, which exits by itself when the VM "
                  "does)")


@task(help={"verbose": "log debug detail"})
@_cli
def vms(c: Context, verbose: bool = False) -> None:
    """List the VMs left running with --keep: name, state, when kept, how to log in."""
    from imagekit.vm import kept

    rows = kept.list_kept()
    if not rows:
        print("no kept VMs")
        return
    for vm in rows:
        print(f"{vm.name}  {'running' if vm.running else 'ended'}  kept {vm.kept_at}  ({vm.distro})")
        print(f"  log in: {vm.ssh_command}" if vm.running else f"  remove: ./ik vm-stop --name {vm.name}")


@task(help={
    "name": "the kept VM's name (see: ./ik vms)",
    "all": "stop every kept VM",
    "verbose": "log debug detail",
})
@_cli
def vm_stop(c: Context, name: str = "", all: bool = False, verbose: bool = False) -> None:
    """Stop a VM left running with --keep (QEMU, its namespace and its fabric) and remove its secrets."""
    from imagekit.core.errors import InputError
    from imagekit.vm import kept

    if bool(name) == all:
        raise InputError("vm-stop needs exactly one of --name NAME or --all")
    targets = kept.list_kept() if all else [kept.find(name)]
    for vm in targets:
        kept.stop(vm)
        print(f"stopped {vm.name}")


# --- checks ---------------------------------------------------------------------------------------


@task(
    help={
        "distro": "the distro id to provision and check (default debian-12; see: invoke distros)",
        "report_dir": "where junit.xml, report.json and report.html go (default: reports/<distro>-<time>/)",
        "swap_percent": "cloud-init images: give the resource disk a swap partition of this share (0: none)",
        "only": "comma-separated check ids or categories to run (default: all)",
        "keep": "leave the VM running afterwards and print how to log in (its emulated fabric keeps serving it)",
        "memory": "guest memory in MiB",
        "cpus": "virtual CPUs (default 0: two where two host cores are free of other imagekit VMs, else one)",
        "verbose": "log debug detail",
    }
)
@_cli
def check(
    c: Context,
    distro: str = "debian-12",
    report_dir: str = "",
    swap_percent: int = 0,
    only: str = "",
    keep: bool = False,
    memory: int = 1024,
    cpus: int = 0,
    verbose: bool = False,
) -> None:
    """Provision a throwaway VM, run the checks over SSH, write reports; exit code 1 if a check fails."""
    from pathlib import Path

    from imagekit.checkrun import check_distro
    from imagekit.checks import catalogue, select, summary_table
    from imagekit.checks.report import default_report_dir
    from imagekit.config import distros as table
    from imagekit.core.errors import CheckFailed, InputError
    from imagekit.matrix.result import recording_result

    if not distro:
        raise InputError("missing required option --distro", hint="see: invoke distros")
    vcpus = _vm_size(memory, cpus)
    d = table.get(distro)
    out_dir = Path(report_dir) if report_dir else default_report_dir(d.id)
    names = [n.strip() for n in only.split(",") if n.strip()]
    ids = [n for n in names if n in catalogue()]
    categories = [n for n in names if n not in ids]
    chosen = None
    if names:
        chosen = (select(ids=ids) if ids else []) + (select(categories=categories) if categories else [])
    with recording_result(out_dir, distro_id=d.id, task="check"):
        outcome = check_distro(d, report_dir=out_dir, swap_percent=swap_percent or None, checks=chosen, keep=keep,
                               memory_mib=memory, cpus=vcpus)
        print(summary_table(outcome.runs))
        for kind, path in outcome.reports.items():
            print(f"{kind:6} {path}")
        if keep:
            print("the VM keeps running: ./ik vms shows how to log in, ./ik vm-stop --name NAME stops it")
        if not outcome.ok:
            bad = [r.check.id for r in outcome.runs if not r.result.ok]
            raise CheckFailed(f"{len(bad)} check(s) did not pass: {', '.join(bad)}",
                              hint=f"evidence in {outcome.reports['html']}")


# --- build, capture, gallery -----------------------------------------------------------------------

@task(
    help={
        "distro": "the distro id to build (default debian-12; see: invoke distros)",
        "version": "the image version, Major.Minor.Patch, each 0-2147483647 as Azure requires (default: "
                   "<distro major>.<minor>.<YYYYMMDD><NN>)",
        "report_dir": "where the build and verify check reports go (default: reports/build-<distro>-<time>/)",
        "skip_deprovision": "TEST OPTION: capture without deprovisioning (the scan and the verify boot must "
                            "catch it)",
        "skip_scan": "TEST OPTION: skip the offline leak scan (to show the verify boot catches a bad image)",
        "memory": "guest memory in MiB (both VMs)",
        "cpus": "virtual CPUs (default 0: two where two host cores are free of other imagekit VMs, else one)",
        "verbose": "log debug detail",
    }
)
@_cli
def build(
    c: Context,
    distro: str = "debian-12",
    version: str = "",
    report_dir: str = "",
    skip_deprovision: bool = False,
    skip_scan: bool = False,
    memory: int = 1024,
    cpus: int = 0,
    verbose: bool = False,
) -> None:
    """Build an image: base, provision + checks, deprovision, capture (VHD + qcow2), verify boot, register."""
    from pathlib import Path

    from imagekit.build import BuildOptions, default_build_report_dir
    from imagekit.build import build as run_build
    from imagekit.config import distros
    from imagekit.core.errors import InputError
    from imagekit.core.versions import Version
    from imagekit.matrix.result import recording_result

    if not distro:
        raise InputError("missing required option --distro", hint="see: invoke distros")
    if version:
        Version.parse(version)  # a bad --version fails here, before any work (build() checks it again)
    vcpus = _vm_size(memory, cpus)
    d = distros.get(distro)
    out_dir = Path(report_dir) if report_dir else default_build_report_dir(d.id)
    with recording_result(out_dir, distro_id=d.id, task="build") as recorded:
        result = run_build(d, BuildOptions(version=version or None, skip_deprovision=skip_deprovision,
                                           skip_scan=skip_scan, memory_mib=memory, cpus=vcpus, report_dir=out_dir))
        recorded.update(version=result.version, image=str(result.path))
    stages = result.manifest.get("timings", {}).get("stages", {})
    for name, seconds in stages.items():
        print(f"  {name:45} {seconds:8.1f} s")
    for a in result.manifest["artifacts"]:
        print(f"{a['name']:11} {a['format']:11} virtual {a['virtual_size'] / 2**30:6.2f} GiB, file "
              f"{a['size'] / 2**30:6.2f} GiB, on disk {a['allocated'] / 2**20:8.1f} MiB  sha256 {a['sha256']}")
    print(f"registered {distro} {result.version}")
    print(result.path)


@task(
    help={
        "distro": "only this distro",
        "latest": "print only the version that resolves as latest (needs --distro)",
        "all": "also list removed versions",
        "json": "print JSON instead of a table",
        "verbose": "log debug detail",
    }
)
@_cli
def images(c: Context, distro: str = "", latest: bool = False, all: bool = False, json: bool = False,
           verbose: bool = False) -> None:
    """List the local gallery's image versions, latest first, with their status."""
    import json as jsonlib

    from imagekit.core.errors import InputError
    from imagekit.gallery import Gallery

    g = Gallery()
    if distro:
        _check_known_distro(g, distro)
    if latest:
        if not distro:
            raise InputError("--latest needs --distro", hint="latest is resolved per distro, as in Azure")
        iv = g.latest(distro)
        print(jsonlib.dumps(iv.as_dict(), indent=2) if json else f"{iv.distro} {iv.version}\n{iv.path}")
        return
    versions = g.versions(distro or None, include_removed=all)
    if json:
        print(jsonlib.dumps([v.as_dict() for v in versions], indent=2))
        return
    if not versions:
        print("no image versions registered" + (f" for {distro}" if distro else ""))
        return
    rows = [("DISTRO", "VERSION", "STATUS", "END OF LIFE", "REGISTERED")]
    rows += [(v.distro, str(v.version), v.status().value, v.end_of_life.isoformat() if v.end_of_life else "-",
              v.registered_at) for v in versions]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print("  ".join(rows[0][i].ljust(widths[i]) for i in range(5)).rstrip())
    for r, v in zip(rows[1:], versions, strict=True):
        print("  ".join(r[i].ljust(widths[i]) for i in range(5)).rstrip())
        for p in v.published:  # where invoke publish put it
            where = p.get("gallery_version_id") or p.get("blob_url")
            regions = f" ({', '.join(p['regions'])})" if p.get("regions") else ""
            print(f"  published: {p.get('state')} {where}{regions} at {p.get('published_at')}")


@task(
    help={
        "distro": "the distro id",
        "version": "the version to deprecate",
        "end_of_life": "end-of-life date, YYYY-MM-DD, after today (UTC): Azure refuses one in the past",
        "keep_in_latest": "do not exclude it from latest until the end-of-life date passes",
        "verbose": "log debug detail",
    }
)
@_cli
def images_deprecate(c: Context, distro: str = "", version: str = "", end_of_life: str = "",
                     keep_in_latest: bool = False, verbose: bool = False) -> None:
    """Deprecate an image version: set its end-of-life date and exclude it from latest."""
    from imagekit.core.errors import InputError
    from imagekit.core.versions import Version
    from imagekit.gallery import Gallery, parse_end_of_life

    if not (distro and version and end_of_life):
        raise InputError("--distro, --version and --end-of-life are required")
    g = Gallery()
    _check_known_distro(g, distro)
    Version.parse(version)
    try:
        eol = parse_end_of_life(end_of_life)
    except InputError as exc:
        raise InputError(f"--end-of-life: {exc.message}", hint=exc.hint) from None
    iv = g.deprecate(distro, version, eol, exclude_from_latest=not keep_in_latest)
    print(f"{iv.distro} {iv.version}: {iv.status().value}, end of life {eol.isoformat()}")


@task(help={"distro": "the distro id", "version": "the version to remove (Major.Minor.Patch)",
            "verbose": "log debug detail"})
@_cli
def images_remove(c: Context, distro: str = "", version: str = "", verbose: bool = False) -> None:
    """Remove an image version's files from the gallery (its number is never reused)."""
    from imagekit.core.errors import InputError
    from imagekit.gallery import Gallery

    if not (distro and version):
        raise InputError("--distro and --version are required")
    g = Gallery()
    _check_known_distro(g, distro)
    g.remove(distro, version)
    print(f"removed {distro} {version}")


@task(
    help={
        "distro": "the distro id",
        "version": "the registered, verified version to publish (Major.Minor.Patch)",
        "storage_account": "the storage account (3-24 lower-case letters and digits); not needed when "
                           "AZURE_STORAGE_CONNECTION_STRING is set",
        "container": "the blob container (3-63 lower-case letters, digits and single '-'); created when missing",
        "blob_name": "the blob's name (default <distro>-<version>.vhd)",
        "blob_endpoint": "the blob service URL (default https://<account>.blob.core.windows.net)",
        "storage_resource_group": "the storage account's resource group (default: --resource-group)",
        "gallery": "the Azure Compute Gallery (it must exist)",
        "resource_group": "the gallery's resource group",
        "image_definition": "the image definition; created when missing (Linux, Generalized, V1)",
        "subscription": "the subscription id (default $AZURE_SUBSCRIPTION_ID)",
        "location": "the gallery's region (default: read from the gallery)",
        "target_region": "a region to replicate to, REGION or REGION=REPLICAS; repeatable (default: the gallery's)",
        "replica_count": "replicas per region where --target-region gives none (default 1)",
        "end_of_life": "the version's end-of-life date, YYYY-MM-DD, after today (UTC)",
        "exclude_from_latest": "exclude the version from 'latest'",
        "publisher": "the image definition's publisher (default imagekit)",
        "offer": "its offer (default: the distro's family)",
        "sku": "its SKU (default: the image definition's name; publisher/offer/SKU are unique in a gallery)",
        "blob_only": "stop after the verified upload (no gallery step)",
        "overwrite": "replace an existing blob with other content (otherwise refused)",
        "workers": "Put Page requests in flight at once (default 8)",
        "arm_endpoint": "the resource manager's base URL (default $IMAGEKIT_ARM_ENDPOINT or "
                        "https://management.azure.com)",
        "dry_run": "print what would be uploaded and the exact gallery requests; touch nothing",
        "verbose": "log debug detail",
    },
    iterable=["target_region"],
)
@_cli
def publish(c: Context, distro: str = "", version: str = "", storage_account: str = "", container: str = "",
            blob_name: str = "", blob_endpoint: str = "", storage_resource_group: str = "", gallery: str = "",
            resource_group: str = "", image_definition: str = "", subscription: str = "", location: str = "",
            target_region: list[str] | None = None, replica_count: int = 1, end_of_life: str = "",
            exclude_from_latest: bool = False, publisher: str = "imagekit", offer: str = "", sku: str = "",
            blob_only: bool = False, overwrite: bool = False, workers: int = 8, arm_endpoint: str = "",
            dry_run: bool = False, verbose: bool = False) -> None:
    """Publish a version to Azure: the VHD as a page blob (sparse, resumable, verified), then a gallery version."""
    from imagekit import publish as pub
    from imagekit.core.errors import InputError
    from imagekit.gallery import Gallery

    if not (distro and version):
        raise InputError("--distro and --version are required", hint="see: invoke --help publish")
    g = Gallery()
    _check_known_distro(g, distro)
    opts = pub.PublishOptions(
        distro=distro, version=version, storage_account=storage_account, container=container, blob_name=blob_name,
        blob_endpoint=blob_endpoint, storage_resource_group=storage_resource_group, gallery=gallery,
        resource_group=resource_group, image_definition=image_definition, subscription=subscription,
        location=location, target_regions=list(target_region or []), replica_count=replica_count,
        end_of_life=end_of_life, exclude_from_latest=exclude_from_latest, publisher=publisher, offer=offer, sku=sku,
        blob_only=blob_only, overwrite=overwrite, workers=workers,
        arm_endpoint=arm_endpoint or os.environ.get("IMAGEKIT_ARM_ENDPOINT") or pub.ARM_ENDPOINT,
        polling_interval=float(os.environ.get("IMAGEKIT_ARM_POLLING_INTERVAL") or 15),
    )
    prepared = pub.prepare(opts, g, connect=not dry_run)
    if dry_run:
        print("\n".join(pub.dry_run(prepared)))
        return
    res = pub.publish(prepared, gallery=g)
    up = res.upload
    if up.already_verified:
        print(f"blob {up.url}: already uploaded and verified; nothing sent")
    else:
        print(f"blob {up.url}: sent {up.sent_bytes} bytes in {up.requests} requests "
              f"({up.resumed_bytes} bytes were already there) of {up.data_bytes} data bytes in a {up.size}-byte "
              "file; verified")
    if res.gallery is not None:
        verb = "created" if res.gallery.version_created else "already there"
        print(f"gallery version {res.gallery.version_id}: {res.gallery.state} ({verb}; regions "
              f"{', '.join(res.gallery.regions)})")
    print(f"published {distro} {prepared.source.image.version}")


def _check_known_distro(gallery: Any, distro: str) -> None:
    """An unknown distro id is an error listing the known ones: the distro table's and any id that has
    versions in the gallery (also removed ones; an id dropped from the table stays listable)."""
    from imagekit.config import distros as table
    from imagekit.core.errors import InputError

    known = set(table.default_table()) | {v.distro for v in gallery.versions(include_removed=True)}
    if distro not in known:
        shown = repr(distro[:40]) + ("..." if len(distro) > 40 else "")
        raise InputError(f"unknown distro {shown}; known: {', '.join(sorted(known))}", hint="see: invoke distros")


# --- benchmarks -----------------------------------------------------------------------------------


@task(help={
    "boot": "the boot benchmark instead: plain boot to the login prompt (the baseline), then QEMU start → Ready, "
            "Ready → SSH, resource disk, checks (and with --build a whole build), as ratios to that baseline",
    "distro": "with --boot: the distro id to measure (repeat for several; default debian-12)",
    "build": "with --boot: also time a whole build (minutes)",
    "cpus": "with --boot: virtual CPUs of the VMs (default 0: chosen as for a build)",
    "memory": "with --boot: guest memory in MiB",
    "output": "also write every figure as JSON to this file (in an existing directory; written atomically)",
    "disk_gib": "virtual size of the benchmark disk in GiB (a hole except for the data)",
    "data_mib": "MiB of files on it (half random, half text)",
    "repeat": "runs per step; the median is reported (--boot: default 1)",
    "workdir": "where the scratch files go (default: the system's temporary directory)",
    "verbose": "log debug detail",
}, iterable=["distro"])
@_cli
def bench(c: Context, boot: bool = False, distro: list[str] | None = None, build: bool = False, cpus: int = 0,
          memory: int = 1024, output: str = "", disk_gib: int = 30, data_mib: int = 1024, repeat: int = 0,
          workdir: str = "", verbose: bool = False) -> None:
    """Time capture (VHD, SHA-256, zstd qcow2) and the offline scan next to plain-tool baselines, or (--boot) a
    provisioned boot next to the guest's plain boot; print ratios."""
    from dataclasses import asdict
    from pathlib import Path

    from imagekit.bench import render, run_capture_benchmark
    from imagekit.bench_boot import boot_benchmark, check_output, render_boot
    from imagekit.core.fsutil import write_json_atomic

    out = Path(output) if output else None
    if out is not None:
        check_output(out)
    if boot:
        from imagekit.config import distros as table

        entries = [table.get(d) for d in (distro or ["debian-12"])]
        vcpus = _vm_size(memory, cpus)
        results = [boot_benchmark(d, repeat=repeat or 1, cpus=vcpus, memory_mib=memory, with_build=build,
                                  workdir=Path(workdir) if workdir else None) for d in entries]
        print(render_boot(results))
        if out is not None:
            write_json_atomic(out, {"benchmark": "boot", "results": results})
        return
    rows = run_capture_benchmark(Path(workdir) if workdir else None, disk_gib=disk_gib, data_mib=data_mib,
                                 repeat=repeat or 3)
    print(render(rows))
    if out is not None:
        write_json_atomic(out, {"benchmark": "capture", "rows": [{**asdict(r), "ratio": r.ratio} for r in rows]})


# --- the distro matrix ----------------------------------------------------------------------------


@task(help={
    "distro": "a distro id to run (repeat for several; default: the whole table)",
    "jobs": "distros at once (default 0: from the host's cores and memory: one per core under TCG, two per core "
            "with KVM)",
    "check_only": "provision + checks for each distro, no capture (invoke check instead of invoke build)",
    "report_dir": "where each distro's reports (<dir>/<distro>/) and the combined report go (default: "
                  "reports/matrix-<time>/)",
    "strict": "also exit 1 when a distro was skipped (its image source cannot be reached from here)",
    "list": "print the selected distros instead of running them",
    "format": "with --list: text (default), json, or github ({\"include\": [...]} for a GitHub Actions "
              "strategy.matrix, on one line)",
    "merge": "build the combined report in --report-dir from these report directories (repeat; each a distro's "
             "directory holding result.json, or a directory of them), run nothing",
    "cpus": "vCPUs per VM (default 0: the host's cores shared among the distros that run at once, at most 2)",
    "memory": "guest memory in MiB per VM",
    "verbose": "log debug detail",
}, iterable=["distro", "merge"])
@_cli
def matrix(c: Context, distro: list[str] | None = None, jobs: int = 0, check_only: bool = False,
           report_dir: str = "", strict: bool = False, list: bool = False, format: str = "text",
           merge: list[str] | None = None, cpus: int = 0, memory: int = 1024, verbose: bool = False) -> None:
    """Build (or --check-only) every distro of the table, or those given, side by side; one combined report."""
    import datetime as dt
    import json as jsonlib
    from pathlib import Path

    from imagekit.core.errors import InputError
    from imagekit.matrix import MatrixOptions, github_matrix, list_rows, merge_reports, plan_matrix, run_matrix
    from imagekit.matrix import select as select_distros
    from imagekit.matrix.plan import JOBS_MAX

    formats = ("text", "json", "github")
    if format not in formats:
        raise InputError(f"--format: bad value {format[:40]!r}; allowed: {', '.join(formats)}")
    if format != "text" and not list:
        raise InputError("--format goes with --list")
    if not 0 <= jobs <= JOBS_MAX:
        raise InputError(f"--jobs: bad value {jobs}; allowed: 1 to {JOBS_MAX}, or 0 for the default (from the "
                         "host's cores and memory)")
    vcpus = _vm_size(memory, cpus)
    chosen = select_distros(distro or [])
    if list:
        if format == "github":
            print(jsonlib.dumps(github_matrix(chosen), separators=(",", ":")))
        elif format == "json":
            print(jsonlib.dumps(list_rows(chosen), indent=1))
        else:
            for row in list_rows(chosen):
                print(f"{row['id']:20} {row['agent']:11} {row['source']:10} "
                      f"{'needs credentials' if row['needs_credentials'] else ''}")
        return
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    if merge:
        if not report_dir:
            raise InputError("--merge needs --report-dir: the directory the combined report goes to")
        summary = merge_reports([Path(m) for m in merge], Path(report_dir))
        _print_matrix_summary(summary, Path(report_dir))
        _matrix_exit(summary, strict)
        return
    out = Path(report_dir) if report_dir else Path("reports") / f"matrix-{stamp}"
    plan = plan_matrix([d.id for d in chosen], jobs=jobs or None, cpus=vcpus, memory_mib=memory)
    print(f"matrix: {len(plan.run)} to run, {len(plan.skipped)} skipped; {plan.jobs} at once, {plan.cpus} vCPU "
          f"per VM ({plan.accel}, {plan.host.cores} cores, {plan.host.mem_available_mib} MiB available); "
          f"reports in {out}", flush=True)
    try:
        run_matrix(plan, MatrixOptions(report_dir=out, check_only=check_only))
    finally:  # also after Ctrl-C: what ran is reported
        summary = merge_reports([out], out)
        _print_matrix_summary(summary, out)
    _matrix_exit(summary, strict)


def _print_matrix_summary(summary: dict[str, Any], out: Any) -> None:
    rows = [("DISTRO", "RESULT", "VERSION", "ELAPSED", "CHECKS", "REASON")]
    for r in summary["distros"]:
        checks = ", ".join(f"{n} {k}" for k, n in sorted(r["checks"].items()))
        reason = (str(r["reason"]).splitlines() or [""])[0][:80]
        rows.append((r["distro"], r["status"].upper(), str(r["version"] or "-"),
                     f"{float(r['elapsed']):.0f} s" if r.get("elapsed") is not None else "-", checks or "-", reason))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(row[i].ljust(widths[i]) for i in range(5)) + "  " + row[5])
    t = summary["totals"]
    print(", ".join(f"{n} {k}" for k, n in t.items()))
    for name in ("index.html", "junit.xml", "summary.json"):
        print(f"{name:12} {out / name}")


def _matrix_exit(summary: dict[str, Any], strict: bool) -> None:
    t = summary["totals"]
    if t.get("failed") or t.get("interrupted"):
        raise Exit(code=1)
    if strict and t.get("skipped"):
        print("imagekit: --strict: skipped distros count as failures", file=sys.stderr)
        raise Exit(code=1)


# --- bring your own image: an image file from any tool, read offline -------------------------------------------


@task(positional=["file"], help={
    "file": "the image file (qcow2, raw, VHD fixed or dynamic, VMDK, ...: whatever qemu-img reads); never written",
    "json": "print the same as JSON (one object: image, partition_table, partitions, boot, os, agents, kernels, "
            "kernel_cmdline, distro, problems, notes)",
    "verbose": "log debug detail (every command run)",
})
@_cli
def inspect(c: Context, file: str | None = None, json: bool = False, verbose: bool = False) -> None:
    """Read an image file offline and read-only, never booting it: format, partitions, boot modes, OS, agents,
    kernels and Hyper-V drivers, kernel command line, the matching distro entry, and what would fail on Azure."""
    import json as json_mod
    from pathlib import Path

    from imagekit.core.errors import InputError
    from imagekit.inspect import inspect_image, render

    if not file:
        raise InputError("missing the image file: invoke inspect FILE")
    report = inspect_image(Path(file))
    print(json_mod.dumps(report, indent=1) if json else render(report))


@task(positional=["file"], help={
    "file": "the image file (qcow2, raw, VHD fixed or dynamic, VMDK, ...: whatever qemu-img reads); never written",
    "json": "print the findings as JSON (path, format, os, findings: kind, path, detail)",
    "verbose": "log debug detail (every command run)",
})
@_cli
def scan(c: Context, file: str | None = None, json: bool = False, verbose: bool = False) -> None:
    """The offline leak scan of an image file from anywhere (what build runs before registering): every finding
    with its file; exit 1 when something must not ship."""
    import json as json_mod
    from dataclasses import asdict
    from pathlib import Path

    from imagekit.core.errors import InputError
    from imagekit.inspect import scan_file

    if not file:
        raise InputError("missing the image file: invoke scan FILE")
    result = scan_file(Path(file))
    if json:
        print(json_mod.dumps({"path": result.path, "format": result.format, "os": result.os,
                              "findings": [asdict(f) for f in result.findings]}, indent=1))
    else:
        print(f"{result.path}: {result.format}, {result.os or 'unknown OS'}")
        for f in result.findings:
            print(f"  {f.kind:<16} {f.path}: {f.detail}")
        print(f"{len(result.findings)} finding(s): this image must not ship" if result.findings else "no findings")
    if result.findings:
        raise Exit(code=1)
