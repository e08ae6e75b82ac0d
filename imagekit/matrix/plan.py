"""What a matrix run will do, settled before anything starts: which distros, how many at once, how many vCPUs
each VM gets, and which distros are skipped because their image source cannot be had from this machine."""

from __future__ import annotations

import concurrent.futures
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from imagekit.config import distros as table
from imagekit.config.distros import Distro, SourceKind
from imagekit.core.errors import InputError
from imagekit.vm.qemu import CPUS_MAX, MEMORY_MIB_MIN

JOBS_MAX = 32
REACH_TIMEOUT = 5.0  # seconds for the one request that tells whether a download source answers at all
HOST_RESERVE_MIB = 1024  # memory left to the host besides the VMs
VM_OVERHEAD_MIB = 512  # a QEMU process's own memory on top of the guest's (TCG's translation cache, buffers)


def select(ids: Sequence[str], distros: Mapping[str, Distro] | None = None) -> list[Distro]:
    """The distros named (in the order given, each once), or the whole table when none is named."""
    t = table.default_table() if distros is None else distros
    if not ids:
        return list(t.values())
    out: list[Distro] = []
    for i in ids:
        d = table.get(i, t)
        if d not in out:
            out.append(d)
    return out


def needs_credentials(d: Distro) -> bool:
    return d.source.kind is SourceKind.DOWNLOAD and bool(d.source.credentials)


def list_rows(distros: Iterable[Distro]) -> list[dict[str, Any]]:
    """One row per distro for ``matrix --list``: what a CI matrix needs to know about it."""
    rows = []
    for d in distros:
        ok, why = d.buildable_here()
        rows.append({"id": d.id, "agent": d.agent.value, "source": d.source.kind.value,
                     "needs_credentials": needs_credentials(d), "builds_here": ok, "why": why})
    return rows


def github_matrix(distros: Iterable[Distro]) -> dict[str, Any]:
    """``{"include": [...]}`` for a GitHub Actions ``strategy.matrix`` (``fromJSON`` of a job output)."""
    return {"include": [{k: r[k] for k in ("id", "agent", "source", "needs_credentials")}
                        for r in list_rows(distros)]}


def source_reachable(d: Distro, timeout: float = REACH_TIMEOUT) -> tuple[bool, str]:
    """Whether this machine can get the distro's image: a bootstrap always can (packages come from the
    configured mirror); a download needs no credentials and its server must answer one request. Any HTTP
    answer counts as reachable (a 404 then fails the build itself, with its own message)."""
    if d.source.kind is SourceKind.BOOTSTRAP:
        return True, "built from the distro's packages"
    if d.source.credentials:
        return False, f"the download needs {d.source.credentials}"
    url = d.source.checksum_url or d.source.url
    host = urlparse(url).hostname or url
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "imagekit"})
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            return True, f"{host} answers"
    except urllib.error.HTTPError as exc:
        return True, f"{host} answers (HTTP {exc.code})"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"cannot reach {host} from this machine ({str(reason)[:120]})"


@dataclass(frozen=True)
class Host:
    cores: int
    mem_available_mib: int
    kvm: bool


def host_facts(kvm: bool) -> Host:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    mem = int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        mem = 0
    return Host(cores=cores, mem_available_mib=mem, kvm=kvm)


def default_jobs(host: Host, memory_mib: int, selected: int) -> int:
    """How many distros at once: a TCG guest keeps a host core busy per vCPU, so one distro per core; a KVM
    guest mostly waits on I/O, so two per core. Never more than the memory holds (each VM's guest memory, its
    QEMU process, and a reserve for the host) or than there are distros."""
    per_core = 2 if host.kvm else 1
    by_cpu = max(1, host.cores * per_core)
    by_mem = max(1, (host.mem_available_mib - HOST_RESERVE_MIB) // (memory_mib + VM_OVERHEAD_MIB))
    return max(1, min(by_cpu, by_mem, selected, JOBS_MAX))


def vcpus_per_vm(host: Host, jobs: int) -> int:
    """The host's cores shared among the VMs that run at once (each distro runs one VM at a time), 1 to 2
    (two vCPUs are where multi-threaded TCG stops paying off on a shared host)."""
    return max(1, min(2, CPUS_MAX, host.cores // max(1, jobs)))


@dataclass
class MatrixPlan:
    run: list[Distro]  # in table order
    skipped: dict[str, str]  # distro id → why its image cannot be had here
    jobs: int
    cpus: int
    memory_mib: int
    accel: str
    host: Host
    notes: list[str] = field(default_factory=list)


def plan_matrix(ids: Sequence[str], *, jobs: int | None = None, cpus: int | None = None, memory_mib: int = 1024,
                distros: Mapping[str, Distro] | None = None, kvm: bool | None = None) -> MatrixPlan:
    """Select, probe the image sources (side by side, each bounded), and size the run."""
    if jobs is not None and not 1 <= jobs <= JOBS_MAX:
        raise InputError(f"--jobs: bad value {jobs}; allowed: 1 to {JOBS_MAX}, or 0 for the default (from the "
                         "host's cores and memory)")
    if not memory_mib >= MEMORY_MIB_MIN:
        raise InputError(f"--memory: {memory_mib} MiB is below the minimum of {MEMORY_MIB_MIN}")
    chosen = select(ids, distros)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(chosen) or 1)) as pool:
        reach = dict(zip([d.id for d in chosen], pool.map(source_reachable, chosen), strict=True))
    run = [d for d in chosen if reach[d.id][0]]
    skipped = {i: why for i, (ok, why) in reach.items() if not ok}
    if kvm is None:
        from imagekit.vm.qemu import Accel, probe_accel

        kvm = probe_accel().accel is Accel.KVM
    host = host_facts(kvm)
    n = jobs or default_jobs(host, memory_mib, len(run) or 1)
    return MatrixPlan(run=run, skipped=skipped, jobs=n, cpus=cpus or vcpus_per_vm(host, min(n, len(run) or 1)),
                      memory_mib=memory_mib, accel="kvm" if kvm else "tcg", host=host)
