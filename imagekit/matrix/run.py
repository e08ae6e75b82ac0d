"""Running the matrix: one child process per distro, at most ``jobs`` at once, their output followed live.

Every child is ``invoke build`` (or ``invoke check`` with ``--check-only``) in a session of its own, with its
report directory ``<report-dir>/<distro>/``. Its output goes, unchanged, to ``<distro>/output.log`` and,
prefixed with the distro id (as Packer prefixes its builders' lines), to the terminal: a live table of each
distro's stage and elapsed time on a TTY, plain lines otherwise (CI logs).

Ctrl-C (SIGINT or SIGTERM to the matrix) is passed to every running child's process group, as a terminal
would pass it to a single build; each child then cleans up as it does alone (its VM, namespace, fabric and
gallery staging go; no version is registered), and no further distro starts. A child that has not ended
``STOP_GRACE`` seconds later is killed with its process group.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO

from imagekit.config.distros import Distro
from imagekit.core.fsutil import write_json_atomic
from imagekit.core.paths import REPO_ROOT
from imagekit.matrix.plan import MatrixPlan
from imagekit.matrix.result import RESULT_FILE, SCHEMA, STEP_START, Status, read_result

STOP_GRACE = 240.0  # seconds a child gets to clean up after Ctrl-C (a VM shutdown, a namespace, a staging dir)
LINE_MAX = 4096  # a child's output line longer than this is cut (the log file keeps it whole)
OUTPUT_LOG = "output.log"


@dataclass
class MatrixOptions:
    report_dir: Path
    check_only: bool = False
    # The command run per distro; tests may put another program in its place. It gets the distro id, its
    # report directory, the vCPU count and the guest memory.
    command: Callable[[Distro, Path, int, int], list[str]] | None = None
    tty: bool | None = None  # None: whether stdout is a terminal
    out: TextIO | None = None  # default sys.stdout


@dataclass
class Outcome:
    distro: str
    status: Status
    reason: str = ""
    elapsed: float = 0.0
    stage: str = ""
    report_dir: Path | None = None
    returncode: int | None = None
    result: dict[str, Any] = field(default_factory=dict)


def child_command(check_only: bool) -> Callable[[Distro, Path, int, int], list[str]]:
    def command(d: Distro, report_dir: Path, cpus: int, memory_mib: int) -> list[str]:
        task = "check" if check_only else "build"
        return [sys.executable, "-m", "invoke", "--search-root", str(REPO_ROOT), task, "--distro", d.id,
                "--report-dir", str(report_dir), "--cpus", str(cpus), "--memory", str(memory_mib)]
    return command


@dataclass
class _Child:
    distro: Distro
    proc: subprocess.Popen[bytes]
    report_dir: Path
    log: IO[bytes]
    started: float
    stage: str = "starting"
    reader: threading.Thread | None = None
    killed: bool = False


class _Display:
    """Prefixed lines, and on a TTY a live table (rich) of each distro's stage and elapsed time."""

    def __init__(self, plan: MatrixPlan, tty: bool, out: TextIO) -> None:
        self.plan, self.tty, self.out = plan, tty, out
        self.width = max([len(d.id) for d in plan.run] + [1])
        self.rows: dict[str, tuple[str, str, float | None]] = {
            d.id: ("waiting", "", None) for d in plan.run}
        for i, why in plan.skipped.items():
            self.rows[i] = (Status.SKIPPED.value, why, 0.0)
        self._live: Any = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if not self.tty:
            yield
            return
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.out, markup=False, highlight=False, emoji=False)
        with Live(self._table(), console=console, refresh_per_second=2, transient=False) as live:
            self._live = live
            try:
                yield
            finally:
                live.update(self._table())
                self._live = None

    def _table(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        t = Table(title=f"imagekit matrix: {len(self.plan.run)} to run, {self.plan.jobs} at once, "
                        f"{self.plan.cpus} vCPU each ({self.plan.accel})", expand=False)
        for col in ("distro", "state", "stage", "elapsed"):
            t.add_column(col)
        now = time.monotonic()
        for i, (state, stage, t0) in self.rows.items():
            el = "" if t0 is None else (f"{t0:.0f} s" if state not in ("running",) else f"{now - t0:.0f} s")
            t.add_row(Text(i), Text(state), Text(stage[:60]), Text(el))
        return t

    def line(self, distro: str, text: str) -> None:
        shown = f"{distro:<{self.width}} | {text}"
        if self._live is not None:
            self._live.console.print(shown, markup=False, highlight=False, soft_wrap=True)
            self._live.update(self._table())
        else:
            print(shown, file=self.out, flush=True)

    def state(self, distro: str, state: str, stage: str, t0: float | None) -> None:
        self.rows[distro] = (state, stage, t0)
        if self._live is not None:
            self._live.update(self._table())

    def tick(self) -> None:
        if self._live is not None:
            self._live.update(self._table())


def _printable(raw: bytes) -> str:
    """A child's output line for the terminal: decoded, control characters (other than tab) shown escaped,
    bounded in length (the child's output carries guest console text)."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    if len(text) > LINE_MAX:
        text = text[:LINE_MAX] + f" … ({len(text) - LINE_MAX} more characters in {OUTPUT_LOG})"
    return "".join(ch if ch == "\t" or (ch >= " " and ch != "\x7f") else f"\\x{ord(ch):02x}" for ch in text)


def _read(child: _Child, lines: queue.Queue[tuple[str, bytes | None]]) -> None:
    assert child.proc.stdout is not None
    for raw in iter(child.proc.stdout.readline, b""):
        child.log.write(raw)
        child.log.flush()
        lines.put((child.distro.id, raw))
    lines.put((child.distro.id, None))


def _matrix_result(report_dir: Path, distro: str, status: Status, why: str, elapsed: float = 0.0,
                   **extra: Any) -> None:
    """result.json written by the matrix itself, for a distro whose own run left none: skipped, not reached
    before Ctrl-C, or a child that ended without writing one."""
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report_dir / RESULT_FILE, {
        "schema": SCHEMA, "distro": distro, "task": "matrix", "status": status.value, "error": why,
        "started": datetime.now(UTC).isoformat(), "elapsed": elapsed, "stages": [], **extra})


def run_matrix(plan: MatrixPlan, opts: MatrixOptions) -> list[Outcome]:
    """Run every planned distro; returns one outcome per distro of the plan (skipped ones included), in the
    plan's order. Raises KeyboardInterrupt after every child has ended when the run was interrupted."""
    out = opts.out or sys.stdout
    tty = out.isatty() if opts.tty is None else opts.tty
    command = opts.command or child_command(opts.check_only)
    opts.report_dir.mkdir(parents=True, exist_ok=True)
    display = _Display(plan, tty, out)
    outcomes: dict[str, Outcome] = {}
    for i, why in plan.skipped.items():
        _matrix_result(opts.report_dir / i, i, Status.SKIPPED, why)
        outcomes[i] = Outcome(i, Status.SKIPPED, why, report_dir=opts.report_dir / i)
    waiting = list(plan.run)
    running: dict[str, _Child] = {}
    lines: queue.Queue[tuple[str, bytes | None]] = queue.Queue()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            stop.set()
            for c in running.values():
                _signal_group(c.proc, signal.SIGINT)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stop_at: float | None = None
    try:
        with display.active():
            while waiting or running:
                while waiting and len(running) < plan.jobs and not stop.is_set():
                    d = waiting.pop(0)
                    running[d.id] = _start(d, opts.report_dir / d.id, command(d, opts.report_dir / d.id,
                                                                            plan.cpus, plan.memory_mib), lines)
                    display.state(d.id, "running", "starting", running[d.id].started)
                if stop.is_set():
                    for d in waiting:
                        why = "not started: the matrix was interrupted"
                        _matrix_result(opts.report_dir / d.id, d.id, Status.INTERRUPTED, why)
                        outcomes[d.id] = Outcome(d.id, Status.INTERRUPTED, why, report_dir=opts.report_dir / d.id)
                        display.state(d.id, Status.INTERRUPTED.value, "not started", 0.0)
                    waiting = []
                    stop_at = stop_at or time.monotonic() + STOP_GRACE
                    if time.monotonic() > stop_at:
                        for c in running.values():
                            if not c.killed:
                                display.line(c.distro.id, f"== still running {STOP_GRACE:.0f} s after Ctrl-C: "
                                                          "killed with its process group")
                                c.killed = True
                            _signal_group(c.proc, signal.SIGKILL)
                try:
                    distro, raw = lines.get(timeout=0.5)
                except queue.Empty:
                    display.tick()
                    continue
                child = running.get(distro)
                if child is None:
                    continue
                if raw is not None:
                    text = _printable(raw)
                    m = STEP_START.match(text.split(": ", 1)[-1])
                    if m and len(m["indent"]) // 2 <= 1:
                        child.stage = m["name"]
                        display.state(distro, "running", child.stage, child.started)
                    display.line(distro, text)
                    continue
                outcome = _finish(child, stopping=stop.is_set())
                del running[distro]
                outcomes[distro] = outcome
                display.state(distro, outcome.status.value, outcome.reason.splitlines()[0] if outcome.reason else
                              outcome.stage, outcome.elapsed)
                display.line(distro, f"== {outcome.status.value.upper()} after {outcome.elapsed:.0f} s"
                             + (f": {outcome.reason.splitlines()[0]}" if outcome.reason else ""))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for c in running.values():  # only on an unexpected error of our own: leave no child behind
            _signal_group(c.proc, signal.SIGINT)
            try:
                c.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(c.proc, signal.SIGKILL)
                c.proc.wait()
            c.log.close()
    order = [*(d.id for d in plan.run), *plan.skipped]
    result = [outcomes[i] for i in order if i in outcomes]
    if stop.is_set():
        raise KeyboardInterrupt
    return result


def _start(d: Distro, report_dir: Path, argv: Sequence[str], lines: queue.Queue[tuple[str, bytes | None]]) -> _Child:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / RESULT_FILE).unlink(missing_ok=True)  # a result from an earlier run must not be read as ours
    log = (report_dir / OUTPUT_LOG).open("wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    child = _Child(distro=d, proc=proc, report_dir=report_dir, log=log, started=time.monotonic())
    child.reader = threading.Thread(target=_read, args=(child, lines), daemon=True, name=f"matrix-{d.id}")
    child.reader.start()
    return child


def _finish(child: _Child, stopping: bool) -> Outcome:
    rc = child.proc.wait()
    if child.reader is not None:
        child.reader.join()
    child.log.close()
    elapsed = round(time.monotonic() - child.started, 1)
    res = read_result(child.report_dir)
    i = child.distro.id
    if res is None or res.get("distro") != i:
        how = f"was killed {STOP_GRACE:.0f} s after Ctrl-C" if child.killed else f"exited with code {rc}"
        why = f"the {i} run {how} and left no {RESULT_FILE}; its output is in {child.report_dir / OUTPUT_LOG}"
        status = Status.INTERRUPTED if stopping or rc in (-signal.SIGINT, 130) else Status.FAILED
        _matrix_result(child.report_dir, i, status, why, elapsed, returncode=rc)
        return Outcome(i, status, why, elapsed, child.stage, child.report_dir, rc, read_result(child.report_dir) or {})
    try:
        status = Status(str(res.get("status")))
    except ValueError:
        status = Status.FAILED
    if status is Status.PASSED and rc != 0:  # a result that says passed from a process that failed is not trusted
        status = Status.FAILED
        res["error"] = f"the run exited with code {rc} after writing a passing result"
    return Outcome(i, status, str(res.get("error") or ""), elapsed, child.stage, child.report_dir, rc, res)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
