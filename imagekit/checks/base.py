"""The check framework: declarative checks, their results, the context they read, and the runner.

A :class:`Check` is data — an id, one sentence of what it verifies and why, the rule it comes from, and
where it applies — plus a function that takes a :class:`CheckContext` and returns a :class:`CheckResult`
whose evidence is the command output that decided it. :func:`run_checks` runs every applicable check;
a check that fails or crashes never stops the others (a crash becomes an ``error`` result carrying the
traceback).

Checks talk to the guest only through :class:`~imagekit.guest.Guest`, so the unit tests drive them with
a test double and the VM tests with the real SSH connection. Commands are cached per context: several
checks reading ``sshd -T`` or ``/proc/swaps`` see the same output and the guest runs it once.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from imagekit.checks.resource_setup import ResourceDiskPlan
from imagekit.distros import Agent, Distro, Family
from imagekit.errors import InputError
from imagekit.guest import CommandResult, Guest
from imagekit.ovf import ProvisioningProfile

log = logging.getLogger("imagekit.checks")


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    ERROR = "error"


@dataclass(frozen=True)
class CheckResult:
    """What one check found: its status, a one-line summary and the evidence that decided it."""

    status: Status
    summary: str
    evidence: str = ""

    @property
    def ok(self) -> bool:
        return self.status in (Status.PASS, Status.SKIP)


Evidence = CommandResult | str


def _join(evidence: Iterable[Evidence]) -> str:
    return "\n\n".join(e.evidence() if isinstance(e, CommandResult) else e for e in evidence if e)


def passed(summary: str, *evidence: Evidence) -> CheckResult:
    return CheckResult(Status.PASS, summary, _join(evidence))


def failed(summary: str, *evidence: Evidence) -> CheckResult:
    return CheckResult(Status.FAIL, summary, _join(evidence))


def skipped(summary: str, *evidence: Evidence) -> CheckResult:
    return CheckResult(Status.SKIP, summary, _join(evidence))


@dataclass(frozen=True)
class HealthReport:
    """One provisioning state the guest reported to the fabric (``POST /machine?comp=health``)."""

    state: str  # "Ready" or "NotReady"
    substatus: str = ""
    description: str = ""
    seconds: float | None = None  # since the VM started, when the emulator records it


class FabricRecord(Protocol):
    """What the checks read from the fabric emulator: the health reports in the order they arrived."""

    @property
    def health_reports(self) -> Sequence[HealthReport]: ...


@dataclass(frozen=True)
class RecordedFabric:
    """A plain :class:`FabricRecord` (built from the emulator after a run, or by hand in tests)."""

    health_reports: tuple[HealthReport, ...] = ()


@dataclass
class CheckContext:
    """Everything a check may read: the guest, the distro entry, the OVF profile, the fabric's record,
    the resource-disk plan the run used, and facts from the run (timings, what the test set-up did)."""

    guest: Guest
    distro: Distro
    profile: ProvisioningProfile
    fabric: FabricRecord = field(default_factory=RecordedFabric)
    plan: ResourceDiskPlan | None = None  # None: derived from the distro (resource_setup.plan_for)
    facts: dict[str, Any] = field(default_factory=dict)
    _cache: dict[tuple[str, bool], CommandResult] = field(default_factory=dict, repr=False)

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        """Run ``command`` in the guest once per context; later calls return the same result."""
        key = (command, sudo)
        if key not in self._cache:
            self._cache[key] = self.guest.run(command, sudo=sudo, timeout=timeout)
        return self._cache[key]


CheckFn = Callable[[CheckContext], CheckResult]


@dataclass(frozen=True)
class Check:
    """One declarative check.

    ``agents``/``families`` limit where it applies (empty: everywhere); ``applies`` is an extra
    predicate on the distro that returns a reason to skip, or None to run.
    """

    id: str
    title: str
    verifies: str  # one sentence: what it verifies and why
    source: str  # the rule it comes from: a waagent.conf key, a certification test, a doc
    category: str
    fn: CheckFn
    agents: frozenset[Agent] = frozenset()
    families: frozenset[Family] = frozenset()
    applies: Callable[[Distro], str | None] | None = None

    def skip_reason(self, distro: Distro) -> str | None:
        if self.agents and distro.agent not in self.agents:
            return f"applies to agent {', '.join(sorted(a.value for a in self.agents))}, not {distro.agent.value}"
        if self.families and distro.family not in self.families:
            return (f"applies to family {', '.join(sorted(f.value for f in self.families))}, "
                    f"not {distro.family.value}")
        if self.applies is not None:
            return self.applies(distro)
        return None

    def run(self, ctx: CheckContext) -> CheckResult:
        """Run the check; never raises (a crash is an ``error`` result with the traceback as evidence)."""
        reason = self.skip_reason(ctx.distro)
        if reason:
            return skipped(f"not applicable: {reason}")
        try:
            result = self.fn(ctx)
        except Exception as exc:  # one crashing check must not stop the others
            log.debug("check %s crashed", self.id, exc_info=True)
            return CheckResult(Status.ERROR, f"check crashed: {type(exc).__name__}: {exc}",
                               traceback.format_exc(limit=8))
        if not isinstance(result, CheckResult):
            return CheckResult(Status.ERROR, f"check returned {type(result).__name__}, not a CheckResult")
        return result


@dataclass(frozen=True)
class CheckRun:
    """A check together with its result and how long it took."""

    check: Check
    result: CheckResult
    seconds: float


_REGISTRY: dict[str, Check] = {}
# Reports list checks in this order: what provisioning did first, then the disks, then the image standard.
CATEGORY_ORDER = ("provisioning", "resource-disk", "swap", "standard")


def check(
    id: str,
    *,
    title: str,
    verifies: str,
    source: str,
    agents: Iterable[Agent] = (),
    families: Iterable[Family] = (),
    applies: Callable[[Distro], str | None] | None = None,
) -> Callable[[CheckFn], CheckFn]:
    """Register the decorated function as a check; the category is the id's first dotted part."""

    def deco(fn: CheckFn) -> CheckFn:
        if id in _REGISTRY:
            raise ValueError(f"duplicate check id {id!r}")
        _REGISTRY[id] = Check(
            id=id, title=title, verifies=verifies, source=source, category=id.split(".", 1)[0], fn=fn,
            agents=frozenset(agents), families=frozenset(families), applies=applies,
        )
        return fn

    return deco


def catalogue() -> dict[str, Check]:
    """Every registered check by id, in registration order."""
    _load_all()
    order = {c: i for i, c in enumerate(CATEGORY_ORDER)}
    ranked = sorted(enumerate(_REGISTRY.values()), key=lambda ic: (order.get(ic[1].category, 99), ic[0]))
    return {c.id: c for _, c in ranked}


def _load_all() -> None:
    # The check modules register themselves on import.
    from imagekit.checks import provisioning, resource_disk, standard  # noqa: F401


def select(ids: Sequence[str] | None = None, categories: Sequence[str] | None = None) -> list[Check]:
    """Checks by id or category (all when neither is given); an unknown name is an error listing the known."""
    cat = catalogue()
    if ids:
        unknown = [i for i in ids if i not in cat]
        if unknown:
            raise InputError(f"unknown check id(s): {', '.join(unknown)}; known: {', '.join(cat)}")
        return [cat[i] for i in ids]
    if categories:
        known = sorted({c.category for c in cat.values()})
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise InputError(f"unknown check categories: {', '.join(unknown)}; known: {', '.join(known)}")
        return [c for c in cat.values() if c.category in categories]
    return list(cat.values())


def run_checks(ctx: CheckContext, checks: Sequence[Check] | None = None) -> list[CheckRun]:
    """Run ``checks`` (default: the whole catalogue) in order; every check runs whatever the others did."""
    runs = []
    for c in catalogue().values() if checks is None else checks:
        start = time.monotonic()
        result = c.run(ctx)
        runs.append(CheckRun(c, result, round(time.monotonic() - start, 3)))
        log.info("check %-40s %s  %s", c.id, result.status.value.upper(), result.summary)
    return runs


def overall_ok(runs: Sequence[CheckRun]) -> bool:
    """True when no check failed or crashed."""
    return all(r.result.ok for r in runs)


def counts(runs: Sequence[CheckRun]) -> Mapping[str, int]:
    out = {s.value: 0 for s in Status}
    for r in runs:
        out[r.result.status.value] += 1
    return out
