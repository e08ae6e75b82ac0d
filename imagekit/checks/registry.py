"""The check framework: declarative checks, their results and the context they read.

A :class:`Check` is data — an id, one sentence of what it verifies and why, the rule it comes from, and
where it applies — plus a function that takes a :class:`CheckContext` and returns a :class:`CheckResult`
whose evidence is the command output that decided it. :func:`imagekit.checks.runner.run_checks` runs
every applicable check; a check that fails or crashes never stops the others (a crash becomes an ``error``
result carrying the traceback).

Checks fail closed. A check reads the guest through :meth:`CheckContext.probe`, which returns a result
only when the probe worked: an exit code the probe does not allow (sudo refused, a tool missing, a read
error), no output where output is required, a shell probe whose closing marker :data:`PROBE_OK` is
missing, or a guest that did not answer in time raises :class:`ProbeFailed`, and :meth:`Check.run` turns
that into an ``error`` result whose evidence is the probe's command, exit code and the tail of its
stderr — never a pass or a skip. A shell probe that may legitimately find nothing says so in its output
(it ends with :data:`PROBE_OK` only when every part of it ran), so "nothing found" and "the command
failed" never look alike.

Checks talk to the guest only through :class:`~imagekit.vm.guest.Guest`, so the unit tests drive them with
a test double and the VM tests with the real SSH connection. Commands are cached per context: several
checks reading ``sshd -T`` or ``/proc/swaps`` see the same output and the guest runs it once.

Probes are batched: :func:`imagekit.checks.runner.run_checks` first runs every check in a collecting pass,
where the first probe a check asks for that has no answer yet is noted and the check is put off
(:class:`Deferred`); the noted probes then run in one guest round trip (:func:`imagekit.vm.guest.run_many`)
and the put-off checks run again, as often as their probes depend on earlier answers. A check's result and
evidence are the ones it would have had with its probes run one by one.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from imagekit.config.distros import Agent, Distro, Family
from imagekit.config.profile import ProvisioningProfile
from imagekit.core.errors import ImagekitError
from imagekit.provision.resource_setup import ResourceDiskPlan
from imagekit.vm.guest import Command, CommandResult, Guest, run_many

log = logging.getLogger(__name__)


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

# A shell probe prints this as its last line only when every part of it ran (see CheckContext.probe).
PROBE_OK = "@@imagekit-probe-ok"
# A shell probe prints this (then a path or name) for "it does not exist": a finding, not a failure.
ABSENT = "@@absent"
_TAIL_LINES = 15


def _tail(text: str, lines: int = _TAIL_LINES, chars: int = 1500) -> str:
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out if len(out) <= chars else "…" + out[-chars:]


class Deferred(BaseException):
    """Raised in a collecting pass when a check asks for a probe with no answer yet; the check runs again
    once the batch has run. A BaseException, so a check's own ``except Exception`` cannot swallow it."""


class ProbeFailed(Exception):
    """A guest probe did not work, so the check learned nothing: the check's result is ``error``."""

    def __init__(self, reason: str, command: str, result: CommandResult | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command = command
        self.result = result

    def evidence(self) -> str:
        text = f"$ {self.command}\n[probe failed] {self.reason}"
        res = self.result
        if res is not None:
            text += f"\n[exit code {res.returncode}]"
            text += f"\n[stderr, last lines]\n{_tail(res.stderr)}" if res.stderr.strip() else "\n[stderr empty]"
            if res.stdout.strip():
                text += f"\n[stdout, last lines]\n{_tail(res.stdout)}"
        return text


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
    # A collecting pass (see run_checks): the probes asked for, as (command, cache it).
    _collect: list[tuple[Command, bool]] | None = field(default=None, repr=False)
    # Batched answers of uncached probes (e.g. a file that may hold a password): each is handed out once.
    _once: dict[tuple[str, bool], CommandResult] = field(default_factory=dict, repr=False)
    # Probes whose batched run raised: they run on their own, so the error is their own.
    _direct: set[tuple[str, bool]] = field(default_factory=set, repr=False)

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        """Run ``command`` in the guest once per context; later calls return the same result.

        Not judged: for evidence only. A check decides on :meth:`probe` results."""
        key = (command, sudo)
        if key not in self._cache:
            self._defer(Command(command, sudo, timeout), cache=True)
            self._cache[key] = self.guest.run(command, sudo=sudo, timeout=timeout)
        return self._cache[key]

    def _defer(self, command: Command, *, cache: bool) -> None:
        if self._collect is not None and (command.command, command.sudo) not in self._direct:
            self._collect.append((command, cache))
            raise Deferred

    def prefetch(self, wanted: Sequence[tuple[Command, bool]]) -> int:
        """Run the probes a collecting pass asked for, in as few guest round trips as the guest allows, and
        keep their answers for the checks' next pass; returns how many ran."""
        unique: dict[tuple[str, bool], tuple[Command, bool]] = {}
        for c, cache in wanted:
            unique.setdefault((c.command, c.sudo), (c, cache))
        todo = list(unique.values())
        for (c, cache), res in zip(todo, run_many(self.guest, [c for c, _ in todo]), strict=True):
            key = (c.command, c.sudo)
            if isinstance(res, Exception):
                self._direct.add(key)  # runs again on its own when asked for, and raises there
            elif cache:
                self._cache[key] = res
            else:
                self._once[key] = res
        return len(todo)

    def probe(self, command: str, *, ok: Iterable[int] = (0,), output: bool = True, marker: bool = False,
              sudo: bool = True, timeout: float = 120.0, cache: bool = True) -> CommandResult:
        """Run ``command`` and return its result if the probe worked; raise :class:`ProbeFailed` if not.

        ``ok``: the exit codes that are answers (e.g. getent's 2, "no such entry"); any other fails.
        ``output``: a successful exit (0) must print something. ``marker``: the command is a shell probe
        that ends by printing :data:`PROBE_OK` only when all of it ran; the marker must be its last line
        and is removed from the returned stdout. ``cache``: False for output that must not be kept
        (e.g. a file that may hold a password). A guest that does not answer (timeout, connection lost)
        fails the probe too.
        """
        try:
            res = self.run(command, sudo=sudo, timeout=timeout) if cache else self._uncached(command, sudo, timeout)
        except (ImagekitError, OSError, TimeoutError) as exc:
            raise ProbeFailed(f"the guest did not answer: {type(exc).__name__}: {exc}", command) from exc
        allowed = tuple(ok)
        if res.returncode not in allowed:
            why = f"exited {res.returncode}" + (f" (allowed: {', '.join(map(str, allowed))})"
                                                 if allowed != (0,) else "")
            raise ProbeFailed(why, command, res)
        if marker:
            # The marker is echoed last; it follows the output directly when that output (a file that
            # does not end in a newline) left the line open.
            text = res.stdout.rstrip("\n")
            if not text.rstrip().endswith(PROBE_OK):
                raise ProbeFailed("did not run to its end (its closing marker is missing): a part of it "
                                  "failed or its output was cut", command, res)
            body = text.rstrip()[: -len(PROBE_OK)]
            res = CommandResult(res.command, res.returncode, body if not body or body.endswith("\n") else body + "\n",
                                res.stderr)
        elif output and res.returncode == 0 and not res.stdout.strip():
            raise ProbeFailed("printed nothing, where output is needed to judge", command, res)
        return res

    def _uncached(self, command: str, sudo: bool, timeout: float) -> CommandResult:
        batched = self._once.pop((command, sudo), None)
        if batched is not None:
            return batched
        self._defer(Command(command, sudo, timeout), cache=False)
        return self.guest.run(command, sudo=sudo, timeout=timeout)

    def probe_failed(self, reason: str, res: CommandResult) -> ProbeFailed:
        """A :class:`ProbeFailed` for a result that ran but printed nothing judgeable (raise it)."""
        return ProbeFailed(reason, res.command, res)


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
        except ProbeFailed as exc:
            log.debug("check %s: probe failed: %s", self.id, exc.reason)
            return CheckResult(Status.ERROR, f"probe failed, nothing judged: `{_short(exc.command)}` {exc.reason}",
                               exc.evidence())
        except Exception as exc:  # one crashing check must not stop the others
            log.debug("check %s crashed", self.id, exc_info=True)
            return CheckResult(Status.ERROR, f"check crashed: {type(exc).__name__}: {exc}",
                               traceback.format_exc(limit=8))
        if not isinstance(result, CheckResult):
            return CheckResult(Status.ERROR, f"check returned {type(result).__name__}, not a CheckResult")
        return result


def _short(command: str, limit: int = 80) -> str:
    one = " ".join(command.split())
    return one if len(one) <= limit else one[: limit - 1] + "…"


@dataclass(frozen=True)
class CheckRun:
    """A check together with its result and how long it took."""

    check: Check
    result: CheckResult
    seconds: float


class Checks:
    """One category module's checks, in the order they are declared: each module makes one
    (``CHECKS = Checks()``) and declares its checks with ``@CHECKS.add(...)``; the catalogue
    (:mod:`imagekit.checks.runner`) lists the modules by name. Nothing registers itself by being imported."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def add(
        self,
        id: str,
        *,
        title: str,
        verifies: str,
        source: str,
        agents: Iterable[Agent] = (),
        families: Iterable[Family] = (),
        applies: Callable[[Distro], str | None] | None = None,
    ) -> Callable[[CheckFn], CheckFn]:
        """Declare the decorated function as a check; the category is the id's first dotted part."""

        def deco(fn: CheckFn) -> CheckFn:
            if id in self._checks:
                raise ValueError(f"duplicate check id {id!r}")
            self._checks[id] = Check(
                id=id, title=title, verifies=verifies, source=source, category=id.split(".", 1)[0], fn=fn,
                agents=frozenset(agents), families=frozenset(families), applies=applies,
            )
            return fn

        return deco

    def __iter__(self) -> Iterator[Check]:
        return iter(self._checks.values())


def overall_ok(runs: Sequence[CheckRun]) -> bool:
    """True when checks ran and none failed or crashed (no checks at all proves nothing)."""
    return bool(runs) and all(r.result.ok for r in runs)


def counts(runs: Sequence[CheckRun]) -> Mapping[str, int]:
    out = {s.value: 0 for s in Status}
    for r in runs:
        out[r.result.status.value] += 1
    return out
