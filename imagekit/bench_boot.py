"""The boot benchmark: what provisioning adds to a guest's own boot, and what a whole build costs, per distro.

Machines here are shared and noisy, so no figure is meaningful alone. The baseline is measured in the same
run: the same guest's plain boot to its login prompt (same VM, NIC and emulated fabric; no provisioning DVD,
no resource disk, so the agent has nothing to do — :func:`imagekit.provision.launch.plain_boot`). Every other
figure is reported next to it as a ratio, or as seconds where the target is in seconds. Each figure is the
median of ``repeat`` runs.

Run: ``./ik bench --boot --distro debian-12 --output bench.json`` (see ``./ik bench --help``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagekit.config.distros import Distro
from imagekit.core.errors import InputError
from imagekit.vm import qemu

# The targets the speed work aims at (each a ratio to the plain boot, or seconds).
TARGETS: dict[str, tuple[str, float]] = {
    "qemu_to_ready": ("ratio", 1.25),
    "ready_to_ssh": ("seconds", 2.0),
    "resource_disk": ("seconds", 5.0),
    "checks": ("seconds", 5.0),
    "build": ("ratio", 5.0),
}


@dataclass(frozen=True)
class Figure:
    name: str
    seconds: float
    what: str

    def judged(self, baseline: float) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "what": self.what, "seconds": round(self.seconds, 2),
                               "ratio_to_plain_boot": round(self.seconds / baseline, 2) if baseline > 0 else None}
        if self.name in TARGETS:
            kind, limit = TARGETS[self.name]
            value = out["ratio_to_plain_boot"] if kind == "ratio" else out["seconds"]
            out["target"] = {"kind": kind, "at_most": limit, "met": value is not None and value <= limit}
        return out


def _provisioned_run(distro: Distro, workdir: Path, cpus: int | None, memory_mib: int) -> dict[str, float]:
    """One provision + resource disk + checks run; the moments (seconds after QEMU started) it recorded."""
    from imagekit.checkrun import check_provisioned
    from imagekit.checks import plan_for, resource_disk_custom_data
    from imagekit.provision.launch import provision

    with provision(distro, custom_data=resource_disk_custom_data(distro), workdir=workdir, cpus=cpus,
                   memory_mib=memory_mib) as pvm:
        check_provisioned(pvm, plan=plan_for(distro), report_dir=workdir / "report")
        return pvm.timings.as_dict()


def _build_run(distro: Distro, workdir: Path, cpus: int | None, memory_mib: int) -> float:
    from imagekit.build import BuildOptions, build
    from imagekit.gallery import Gallery

    start = time.monotonic()
    build(distro, BuildOptions(gallery=Gallery(workdir / "images"), report_dir=workdir / "reports",
                               workdir=workdir / "work", cpus=cpus, memory_mib=memory_mib))
    return time.monotonic() - start


def boot_benchmark(distro: Distro, *, repeat: int = 1, cpus: int | None = None, memory_mib: int = 1024,
                   with_build: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    """Every figure of one distro as a JSON-ready dict (see the module docstring)."""
    from imagekit.base import ensure_base
    from imagekit.provision.launch import plain_boot

    if not 1 <= repeat <= 20:
        raise InputError(f"bad --repeat {repeat}; allowed: 1 to 20")
    accel = qemu.probe_accel().accel
    cpus = cpus or qemu.choose_cpus()  # the runs go one after another, so each would choose the same
    ensure_base(distro)  # not timed: a cached base image is the common case
    with tempfile.TemporaryDirectory(prefix="ik-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        plain = [plain_boot(distro, workdir=root / f"plain{i}", cpus=cpus, memory_mib=memory_mib, accel=accel)
                 for i in range(repeat)]
        runs = [_provisioned_run(distro, root / f"prov{i}", cpus, memory_mib) for i in range(repeat)]
        builds = [_build_run(distro, root / f"build{i}", cpus, memory_mib) for i in range(repeat)] if with_build \
            else []
    baseline = statistics.median(plain)

    def moment(name: str) -> list[float]:
        missing = [i for i, r in enumerate(runs) if name not in r]
        if missing:
            raise RuntimeError(f"the provisioned run recorded no {name!r} moment (it recorded {list(runs[0])})")
        return [r[name] for r in runs]

    ready, ssh = moment("ready"), moment("ssh ready")
    disk, checks = moment("resource disk handled"), moment("checks done")
    figures = [
        Figure("qemu_to_ready", statistics.median(ready), "QEMU start to the agent's Ready report"),
        Figure("ready_to_ssh", statistics.median([b - a for a, b in zip(ready, ssh, strict=True)]),
               "Ready to a working SSH login"),
        Figure("resource_disk", statistics.median([b - a for a, b in zip(ssh, disk, strict=True)]),
               "SSH login to the resource disk handled by the agent"),
        Figure("checks", statistics.median([b - a for a, b in zip(disk, checks, strict=True)]), "all checks"),
    ]
    if builds:
        figures.append(Figure("build", statistics.median(builds), "a whole build (build VM, capture, scan, verify VM)"))
    return {
        "distro": distro.id, "agent": distro.agent.value, "accel": accel.value, "cpus": cpus,
        "memory_mib": memory_mib, "repeat": repeat,
        "plain_boot": {"seconds": round(baseline, 2), "runs": [round(p, 2) for p in plain],
                       "what": "the same guest's boot to its login prompt, no DVD, no agent work"},
        "figures": [f.judged(baseline) for f in figures],
    }


def render_boot(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines.append(f"{r['distro']} ({r['agent']}, {r['accel']}, {r['cpus']} vCPU, median of {r['repeat']}): "
                     f"plain boot to login prompt {r['plain_boot']['seconds']:.1f} s")
        for f in r["figures"]:
            t = f.get("target")
            goal = ""
            if t:
                unit = "×" if t["kind"] == "ratio" else " s"
                goal = f"  target ≤ {t['at_most']:g}{unit}: {'met' if t['met'] else 'NOT met'}"
            lines.append(f"  {f['name']:<15} {f['seconds']:7.1f} s  {f['ratio_to_plain_boot']:5.2f}× plain boot"
                         f"{goal}")
    return "\n".join(lines)


def check_output(path: Path) -> None:
    """Refuse an --output the results could not be written to, before minutes of benchmarking."""
    if path.is_dir() or str(path).endswith("/"):
        raise InputError(f"--output {path} is a directory; allowed: a file path in an existing directory, "
                         "e.g. bench.json")
    if not path.parent.is_dir():
        raise InputError(f"--output {path}: directory {path.parent} does not exist; allowed: a file path in an "
                         "existing directory")
