"""``result.json``: what one distro's ``build`` or ``check`` came to, written beside its reports whatever
happens (passed, failed with the error, interrupted), so a matrix — or the CI job that merges the per-distro
artifacts — never has to guess from which files happen to exist.

    with recording_result(report_dir, distro_id="debian-12", task="build") as res:
        result = build(...)
        res.update(version=result.version, image=str(result.path))
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from imagekit.core.errors import ImagekitError
from imagekit.core.fsutil import write_json_atomic

SCHEMA = "imagekit.result/1"
RESULT_FILE = "result.json"
# The step lines of imagekit.core.log.step: "▶ name" on entry, "✔ name (1.2 s)" / "✘ name (1.2 s)" on exit,
# indented two spaces per nesting level.
STEP_START = re.compile(r"^(?P<indent>(?:  )*)▶ (?P<name>.+)$")
STEP_END = re.compile(r"^(?P<indent>(?:  )*)(?P<mark>[✔✘]) (?P<name>.+) \((?P<seconds>[0-9.]+) s\)$")
STAGE_DEPTH = 1  # stages are the steps at nesting depth 0 and 1 (e.g. "build VM (provision … capture)",
#                  "build VM: checks")


class Status(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    INTERRUPTED = "interrupted"


class _StageRecorder(logging.Handler):
    """Collects the finished steps of depth ≤ STAGE_DEPTH from the log, in order."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stages: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            m = STEP_END.match(record.getMessage())
        except Exception:  # a record that does not format is not a step line
            return
        if m and len(m["indent"]) // 2 <= STAGE_DEPTH:
            self.stages.append({"name": m["name"], "seconds": float(m["seconds"]), "ok": m["mark"] == "✔",
                                "depth": len(m["indent"]) // 2})


@contextlib.contextmanager
def recording_result(report_dir: Path, *, distro_id: str, task: str) -> Iterator[dict[str, Any]]:
    """Write ``report_dir/result.json`` when the block ends, however it ends; the block may add fields."""
    report_dir.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    recorder = _StageRecorder()
    logger = logging.getLogger("imagekit")
    logger.addHandler(recorder)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    status, error = Status.FAILED, ""
    try:
        yield extra
        status = Status.PASSED
    except KeyboardInterrupt:
        status, error = Status.INTERRUPTED, "interrupted (Ctrl-C)"
        raise
    except ImagekitError as exc:
        error = str(exc)
        raise
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        logger.removeHandler(recorder)
        write_json_atomic(report_dir / RESULT_FILE, {
            "schema": SCHEMA, "distro": distro_id, "task": task, "status": status.value, "error": error,
            "started": started.isoformat(), "elapsed": round(time.monotonic() - t0, 1),
            "stages": recorder.stages, **extra,
        })


def read_result(report_dir: Path) -> dict[str, Any] | None:
    """The result a run left in ``report_dir``, or None when there is none (or it is not one of ours)."""
    import json

    try:
        data = json.loads((report_dir / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("distro"), str):
        return None
    return data
