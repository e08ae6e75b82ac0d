"""A stand-in for one distro's ``invoke build`` in the matrix tests (the real child boots VMs for minutes;
the matrix's own behaviour — scheduling, output, results, Ctrl-C — is what these tests are about, and the VM
lane runs the real thing). It logs step lines the way imagekit.core.log.step does and writes result.json
with the same recorder the real tasks use.

    python -m tests.matrix_child BEHAVIOUR DISTRO REPORT_DIR SHARED_DIR

Behaviours: pass, fail, no-result (exit 3 without result.json), lie (result passed, exit 2), noisy (control
characters and a long line), wait-peer (pass once the other waiting child has started, fail after 60 s),
wait-sigint (run until SIGINT, then clean up), ignore-sigint (ignore SIGINT; the matrix must kill it).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from imagekit.core.errors import BuildError
from imagekit.core.log import setup_logging, step
from imagekit.matrix.result import recording_result


def note(shared: Path, text: str) -> None:
    with (shared / "events").open("a") as f:
        f.write(text + "\n")


def main() -> int:
    behaviour, distro, report_dir, shared = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    setup_logging()
    log = logging.getLogger("imagekit.test")
    (shared / f"pid-{distro}").write_text(str(os.getpid()))
    note(shared, f"start {distro}")
    if behaviour == "ignore-sigint":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if behaviour == "no-result":
            print("about to crash", flush=True)
            return 3
        with recording_result(report_dir, distro_id=distro, task="build") as rec:
            with step("base image"):
                time.sleep(0.05)
            with step("build VM (provision … capture)"), step("build VM: checks"):
                if behaviour == "noisy":
                    sys.stdout.buffer.write(b"bell\x07 esc\x1b[31m red " + b"x" * 9000 + b"\n")
                    sys.stdout.flush()
                if behaviour == "wait-peer":
                    (shared / f"started-{distro}").touch()
                    deadline = time.monotonic() + 60
                    while len(list(shared.glob("started-*"))) < 2:
                        if time.monotonic() > deadline:
                            raise BuildError("the peer never started beside this one")
                        time.sleep(0.05)
                if behaviour in ("wait-sigint", "ignore-sigint"):
                    (shared / f"started-{distro}").touch()
                    while True:
                        time.sleep(0.05)
                if behaviour == "fail":
                    raise BuildError(f"{distro}: the verify VM did not provision")
            rec.update(version="1.2.3", image=str(report_dir / "image"))
            log.info("done")
        if behaviour == "lie":
            return 2
        return 0
    except KeyboardInterrupt:
        (shared / f"cleaned-{distro}").touch()
        return 130
    except BuildError as exc:
        print(f"imagekit: error: {exc}", file=sys.stderr)
        return 1
    finally:
        note(shared, f"end {distro}")


if __name__ == "__main__":
    sys.exit(main())
