"""The catalogue and the runner: every check of the category modules, in report order, and running them.

The catalogue is the category modules listed here by name (each holds its checks in a
:class:`~imagekit.checks.registry.Checks`); a new category module is added to :data:`CATEGORY_MODULES`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from imagekit.checks.categories import family, provisioning, resource_disk, standard
from imagekit.checks.registry import Check, CheckContext, CheckResult, CheckRun, Checks, Deferred
from imagekit.core.errors import InputError
from imagekit.vm.guest import Command

log = logging.getLogger(__name__)

# Reports list checks in this order: what provisioning did first, then the disks, then the image standard.
CATEGORY_ORDER = ("provisioning", "resource-disk", "swap", "standard")
CATEGORY_MODULES: tuple[Checks, ...] = (provisioning.CHECKS, resource_disk.CHECKS, standard.CHECKS, family.CHECKS)


def catalogue() -> dict[str, Check]:
    """Every check by id: by category in :data:`CATEGORY_ORDER`, then in declaration order."""
    declared = [c for module in CATEGORY_MODULES for c in module]
    ids = [c.id for c in declared]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"duplicate check id(s) across category modules: {', '.join(dup)}")
    order = {c: i for i, c in enumerate(CATEGORY_ORDER)}
    ranked = sorted(enumerate(declared), key=lambda ic: (order.get(ic[1].category, 99), ic[0]))
    return {c.id: c for _, c in ranked}


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


# Collecting passes before the checks still waiting run with their probes one by one: a check needs one pass
# per probe that depends on an earlier probe's answer (few need more than two).
MAX_BATCH_ROUNDS = 6


def run_checks(ctx: CheckContext, checks: Sequence[Check] | None = None) -> list[CheckRun]:
    """Run ``checks`` (default: the whole catalogue); every check runs whatever the others did. The probes are
    batched (see :mod:`imagekit.checks.registry`); the results come in the order of ``checks``.

    A check's ``seconds`` is the time of its last pass plus its share of the batch round trips it waited on."""
    todo = list(catalogue().values() if checks is None else checks)
    results: dict[int, CheckResult] = {}
    seconds = dict.fromkeys(range(len(todo)), 0.0)
    waiting = list(range(len(todo)))
    for round_no in range(1, MAX_BATCH_ROUNDS + 1):
        wanted: list[tuple[Command, bool]] = []
        waiting = _collecting_pass(ctx, todo, waiting, wanted, results, seconds)
        if not waiting:
            break
        start = time.monotonic()
        n = ctx.prefetch(wanted)
        took = time.monotonic() - start
        log.debug("checks: pass %d put off %d checks; their %d probes ran in %.2f s", round_no, len(waiting), n, took)
        for i in waiting:
            seconds[i] += took / len(waiting)
    for i in waiting:  # still waiting after MAX_BATCH_ROUNDS: the rest of their probes run one by one
        start = time.monotonic()
        results[i] = todo[i].run(ctx)
        seconds[i] += time.monotonic() - start
    runs = []
    for i, c in enumerate(todo):
        runs.append(CheckRun(c, results[i], round(seconds[i], 3)))
        log.info("check %-40s %s  %s", c.id, results[i].status.value.upper(), results[i].summary)
    return runs


def _collecting_pass(ctx: CheckContext, todo: Sequence[Check], waiting: Sequence[int],
                     wanted: list[tuple[Command, bool]], results: dict[int, CheckResult],
                     seconds: dict[int, float]) -> list[int]:
    """Run the waiting checks once, noting in ``wanted`` the probes they ask for that have no answer yet;
    returns the checks put off until those have run."""
    put_off = []
    ctx._collect = wanted
    try:
        for i in waiting:
            start = time.monotonic()
            try:
                results[i] = todo[i].run(ctx)
            except Deferred:
                put_off.append(i)
            finally:
                seconds[i] += time.monotonic() - start
    finally:
        ctx._collect = None
    return put_off
