"""Logging set-up and timed, nested steps.

``with step("Installing packages"):`` logs the start and the elapsed time of each step and records it
in a :class:`Timings` object that manifests and reports read back.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger("imagekit")


@dataclass
class Timings:
    """Elapsed seconds per named step, in the order the steps started."""

    steps: dict[str, float] = field(default_factory=dict)

    def record(self, name: str, seconds: float) -> None:
        self.steps[name] = round(seconds, 3)

    def as_dict(self) -> dict[str, float]:
        return dict(self.steps)


_depth = 0


@contextlib.contextmanager
def step(name: str, timings: Timings | None = None, logger: logging.Logger | None = None) -> Iterator[None]:
    """Log ``name`` on entry and its elapsed time on exit (also when it fails)."""
    global _depth
    lg = logger or log
    indent = "  " * _depth
    lg.info("%s▶ %s", indent, name)
    start = time.monotonic()
    _depth += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _depth -= 1
        elapsed = time.monotonic() - start
        if timings is not None:
            timings.record(name, elapsed)
        lg.info("%s%s %s (%.1f s)", indent, "✔" if ok else "✘", name, elapsed)


def setup_logging(verbose: bool = False) -> None:
    """Configure the root ``imagekit`` logger for command-line use (stderr, short format)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("imagekit")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
