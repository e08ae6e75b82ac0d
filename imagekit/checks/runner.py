"""The catalogue and the runner: every check of the category modules, in report order, and running them.

The catalogue is the category modules listed here by name (each holds its checks in a
:class:`~imagekit.checks.registry.Checks`); a new category module is added to :data:`CATEGORY_MODULES`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from imagekit.checks.categories import family, provisioning, resource_disk, standard
from imagekit.checks.registry import Check, CheckContext, CheckRun, Checks
from imagekit.core.errors import InputError

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


def run_checks(ctx: CheckContext, checks: Sequence[Check] | None = None) -> list[CheckRun]:
    """Run ``checks`` (default: the whole catalogue) in order; every check runs whatever the others did."""
    runs = []
    for c in catalogue().values() if checks is None else checks:
        start = time.monotonic()
        result = c.run(ctx)
        runs.append(CheckRun(c, result, round(time.monotonic() - start, 3)))
        log.info("check %-40s %s  %s", c.id, result.status.value.upper(), result.summary)
    return runs
