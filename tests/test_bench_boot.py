"""The boot benchmark's figures, ratios and targets (the arithmetic, with literal figures), its output file
checked before any VM boots, and its table. The benchmark itself boots VMs for minutes: it is run by hand
(``./ik bench --boot``), and its real output is in the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagekit.bench_boot import Figure, check_output, render_boot
from imagekit.core.errors import InputError
from imagekit.core.fsutil import write_json_atomic


def test_ratio_targets_are_judged_against_the_plain_boot() -> None:
    # The targets: Ready within 1.25x the plain boot, a build within 5x.
    assert Figure("qemu_to_ready", 31.0, "").judged(25.0)["target"] == {"kind": "ratio", "at_most": 1.25,
                                                                         "met": True}
    assert Figure("qemu_to_ready", 31.5, "").judged(25.0)["target"]["met"] is False  # 1.26x
    assert Figure("build", 124.0, "").judged(25.0)["ratio_to_plain_boot"] == 4.96
    assert Figure("build", 126.0, "").judged(25.0)["target"]["met"] is False


def test_second_targets_are_judged_in_seconds_whatever_the_baseline() -> None:
    assert Figure("ready_to_ssh", 2.0, "").judged(100.0)["target"]["met"] is True
    assert Figure("ready_to_ssh", 2.1, "").judged(1.0)["target"]["met"] is False
    assert Figure("checks", 4.9, "").judged(25.0)["target"] == {"kind": "seconds", "at_most": 5.0, "met": True}
    assert Figure("resource_disk", 18.0, "").judged(25.0)["target"]["met"] is False


def test_a_figure_without_a_target_has_none_and_a_zero_baseline_gives_no_ratio() -> None:
    out = Figure("other", 3.0, "x").judged(0.0)
    assert "target" not in out and out["ratio_to_plain_boot"] is None


@pytest.mark.parametrize("given", ["dir", "dir/", "missing/bench.json"])
def test_an_output_the_results_cannot_go_to_is_refused_up_front(tmp_path: Path, given: str) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="allowed: a file path in an existing directory"):
        check_output(Path(str(tmp_path / given) + ("/" if given.endswith("/") else "")))


def test_the_table_and_the_json_carry_every_figure(tmp_path: Path) -> None:
    result = {"distro": "debian-12", "agent": "waagent", "accel": "tcg", "cpus": 1, "memory_mib": 1024,
              "repeat": 1, "plain_boot": {"seconds": 25.0, "runs": [25.0], "what": ""},
              "figures": [Figure("qemu_to_ready", 40.0, "").judged(25.0), Figure("checks", 3.0, "").judged(25.0)]}
    table = render_boot([result])
    assert "plain boot to login prompt 25.0 s" in table
    assert "qemu_to_ready      40.0 s   1.60× plain boot  target ≤ 1.25×: NOT met" in table
    assert "checks              3.0 s   0.12× plain boot  target ≤ 5 s: met" in table
    out = tmp_path / "bench.json"
    write_json_atomic(out, {"benchmark": "boot", "results": [result]})
    import json

    assert json.loads(out.read_text())["results"][0]["figures"][0]["ratio_to_plain_boot"] == 1.6
