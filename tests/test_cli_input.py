"""Bad input on the command line, as a new user types it: each ends in one ``imagekit: error: ...`` line
saying what was wrong (and a hint saying what is allowed), exit code 1 (the tasks layer's code for every
toolkit error), no traceback, and nothing written. Every case runs the real CLI (``.venv/bin/invoke``) in a
subprocess, against a gallery and a cache in the test's temp dir."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from imagekit.core.paths import REPO_ROOT
from imagekit.media.iso import read_ovf_iso

INVOKE = REPO_ROOT / ".venv" / "bin" / "invoke"
PASSWORD = "Cli-Passw0rd!"
WA_NS = "{http://schemas.microsoft.com/windowsazure}"
LONG_VERSION = "1.0." + "9" * 5000


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    if not INVOKE.exists():
        pytest.fail(f"{INVOKE} is missing; run ./ik setup")
    return dict(os.environ, IMAGEKIT_IMAGES=str(tmp_path / "gallery"), IMAGEKIT_CACHE=str(tmp_path / "cache"),
                PYTHONPATH=str(REPO_ROOT))


@pytest.fixture
def key(tmp_path: Path) -> Path:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    path = tmp_path / "key.pub"
    path.write_text(pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
                    + " t@x\n")
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def ik(env: dict[str, str], *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, str(INVOKE), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300, check=False)


def refused(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert a clean refusal; return the error line. ``fragments`` must all appear in the error + hint."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    errors = [i for i, ln in enumerate(lines) if ln.startswith("imagekit: error: ")]
    assert len(errors) == 1, proc.stderr
    text = "\n".join(lines[errors[0]:])
    for f in fragments:
        assert f in text, (f, text)
    assert len(lines[errors[0]]) < 400, "the error line must not echo a huge input back"
    return lines[errors[0]]


def iso_args(key: Path, output: str, *more: str) -> tuple[str, ...]:
    return ("iso", "--hostname", "cli-vm", "--username", "azureuser", "--ssh-key", str(key), "--output", output,
            *more)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- iso --output ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "expect"),
    [
        ("/sys/ovf.iso", "is on a kernel pseudo-filesystem"),
        ("/sys/kernel/ovf.iso", "is on a kernel pseudo-filesystem"),
        ("/proc/ovf.iso", "is on a kernel pseudo-filesystem"),
        ("/proc/self/ovf.iso", "is on a kernel pseudo-filesystem"),
    ],
)
def test_iso_output_under_proc_or_sys(env: dict[str, str], key: Path, where: str, expect: str) -> None:
    proc = ik(env, *iso_args(key, where))
    refused(proc, expect, "allowed:")
    assert not Path(where).exists()


def test_iso_output_name_too_long(env: dict[str, str], key: Path, out: Path) -> None:
    proc = ik(env, *iso_args(key, str(out / ("a" * 300))))
    refused(proc, "the file name is 300 bytes, longer than the file system's limit of 255", "allowed:")
    assert tree(out) == []


def test_iso_output_name_near_the_limit_works(env: dict[str, str], key: Path, out: Path) -> None:
    """A 250-byte name is legal; the temp file next to it must not be named after it (+14 bytes: too long)."""
    proc = ik(env, *iso_args(key, str(out / ("b" * 250))))
    assert proc.returncode == 0, proc.stderr
    assert tree(out) == ["b" * 250]


@pytest.mark.parametrize("given", ["out/newdir/", "out/", "out"])
def test_iso_output_directory_is_refused_not_written_as_a_file(
    env: dict[str, str], key: Path, out: Path, tmp_path: Path, given: str
) -> None:
    """A path naming a directory (a trailing slash, or an existing directory) is refused, saying to name the
    file; `out/newdir/` must not become a file called `newdir`."""
    proc = ik(env, *iso_args(key, f"{tmp_path}/{given}"))  # a string: Path() would drop the trailing /
    refused(proc, "directory", "ovf.iso", "allowed:")
    assert tree(out) == []


def test_iso_output_in_a_missing_directory(env: dict[str, str], key: Path, out: Path) -> None:
    proc = ik(env, *iso_args(key, str(out / "missing" / "ovf.iso")))
    refused(proc, "does not exist", "allowed:")
    assert tree(out) == []


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False).returncode == 0


needs_unshare = pytest.mark.skipif(not _can_unshare(), reason="needs unshare -rm (user + mount namespaces)")

# Mount a tmpfs with the given options on $1 in a private mount namespace, run the rest, then list what is left.
_MOUNTED = 'd="$1"; o="$2"; shift 2; mount -t tmpfs -o "$o" none "$d" || exit 99; "$@"; rc=$?; ' \
           'echo "LEFT:[$(ls -A "$d")]" >&2; exit $rc'


@needs_unshare
def test_iso_output_on_a_read_only_file_system(env: dict[str, str], key: Path, out: Path) -> None:
    prefix = ("unshare", "-rm", "sh", "-c", _MOUNTED, "sh", str(out), "ro")
    proc = ik(env, *iso_args(key, str(out / "ovf.iso")), prefix=prefix)
    refused(proc, "cannot write", "Read-only file system", "allowed:")
    assert "LEFT:[]" in proc.stderr
    assert tree(out) == []


@needs_unshare
def test_iso_output_on_a_full_file_system_leaves_nothing_half_written(
    env: dict[str, str], key: Path, out: Path
) -> None:
    """64 KiB of space for a 550 KiB ISO: the write fails midway, and no partial temp file is left."""
    prefix = ("unshare", "-rm", "sh", "-c", _MOUNTED, "sh", str(out), "size=64k")
    proc = ik(env, *iso_args(key, str(out / "ovf.iso")), prefix=prefix)
    refused(proc, "cannot write", "No space left on device")
    assert "LEFT:[]" in proc.stderr


# --- image versions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("images-remove", "--distro", "debian-12", "--version", LONG_VERSION),
        ("images-deprecate", "--distro", "debian-12", "--version", LONG_VERSION, "--end-of-life", "2099-01-01"),
        ("build", "--distro", "debian-12", "--version", LONG_VERSION),
        ("images-remove", "--distro", "debian-12", "--version", "1.0.99999999999"),
        ("build", "--distro", "debian-12", "--version", "1.0.2147483648"),
    ],
    ids=["remove", "deprecate", "build", "remove-11-digits", "build-2^31"],
)
def test_version_out_of_azures_format(env: dict[str, str], tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = ik(env, *args)
    # Azure's rule: Major.Minor.Patch, each part a 32-bit signed integer (0..2147483647).
    refused(proc, "Major.Minor.Patch", "2147483647")
    assert not (tmp_path / "gallery").exists() and not (tmp_path / "cache").exists()


# --- unknown distro ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("images", "--distro", "nope"),
        ("images", "--latest", "--distro", "nope"),
        ("images", "--json", "--distro", "nope"),
        ("images-remove", "--distro", "nope", "--version", "1.0.0"),
        ("images-deprecate", "--distro", "nope", "--version", "1.0.0", "--end-of-life", "2099-01-01"),
    ],
)
def test_unknown_distro_is_an_error_listing_the_known_ones(env: dict[str, str], args: tuple[str, ...]) -> None:
    line = refused(ik(env, *args), "unknown distro 'nope'", "known:")
    assert "debian-12" in line and "debian-13" in line  # ids of distros/*.toml
    assert "invoke build" not in line


def test_known_distro_without_versions_is_a_normal_message(env: dict[str, str]) -> None:
    proc = ik(env, "images", "--distro", "debian-13")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no image versions registered for debian-13"


def test_a_registered_id_that_is_not_in_the_table_stays_listable(env: dict[str, str], tmp_path: Path) -> None:
    from imagekit.gallery import Gallery

    g = Gallery(tmp_path / "gallery")
    with g.staging() as st:
        (st.path / "disk.vhd").write_bytes(b"x")
        g.register("retired-distro", st, {"artifacts": []}, None, distro_version="3")
    proc = ik(env, "images", "--distro", "retired-distro", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [v["distro"] for v in json.loads(proc.stdout)] == ["retired-distro"]


# --- end-of-life dates ----------------------------------------------------------------------------------------


def _gallery_with_one_version(tmp_path: Path) -> Path:
    from imagekit.core.versions import Version
    from imagekit.gallery import Gallery

    g = Gallery(tmp_path / "gallery")
    with g.staging() as st:
        (st.path / "disk.vhd").write_bytes(b"x")
        g.register("debian-12", st, {"artifacts": []}, Version(12, 0, 1))
    return tmp_path / "gallery" / "index.json"


def _today() -> dt.date:
    """Today in UTC, read when a test runs (not when it is collected: a suite may run across midnight)."""
    return dt.datetime.now(dt.UTC).date()


def _days_from_today(days: int) -> str:
    return (_today() + dt.timedelta(days=days)).isoformat()


@pytest.mark.parametrize(
    ("given", "expect"),
    [
        ("20261231", "bad end-of-life date '20261231'"),  # ISO 8601 basic format: date.fromisoformat takes it
        ("2026-W53-4", "bad end-of-life date '2026-W53-4'"),  # ISO week date: date.fromisoformat takes it too
        ("2026-12-31T00:00", "bad end-of-life date"),
        ("31.12.2099", "bad end-of-life date"),
        ("2099-02-30", "no such day"),
        ("1999-01-01", "end-of-life date 1999-01-01 is not after today"),
        (-1, "is not after today"),  # yesterday, as days from the day the test runs
        (0, "is not after today"),  # today
    ],
)
def test_end_of_life_is_a_future_yyyy_mm_dd(env: dict[str, str], tmp_path: Path, given: str | int,
                                            expect: str) -> None:
    index = _gallery_with_one_version(tmp_path)
    before = index.read_bytes()
    if isinstance(given, int):
        given = _days_from_today(given)
    proc = ik(env, "images-deprecate", "--distro", "debian-12", "--version", "12.0.1", "--end-of-life", given)
    refused(proc, "--end-of-life", expect, "YYYY-MM-DD")
    assert index.read_bytes() == before


def test_end_of_life_tomorrow_is_accepted(env: dict[str, str], tmp_path: Path) -> None:
    _gallery_with_one_version(tmp_path)
    for _attempt in range(2):  # a second try only if midnight (UTC) passed while the first one ran
        day = _today()
        tomorrow = _days_from_today(1)
        proc = ik(env, "images-deprecate", "--distro", "debian-12", "--version", "12.0.1", "--end-of-life", tomorrow)
        if proc.returncode == 0 or _today() == day:
            break
    assert proc.returncode == 0, proc.stderr
    assert f"end of life {tomorrow}" in proc.stdout


# --- the password file ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [PASSWORD + "\nsecond line\n", PASSWORD + "\r\n# a note\r\n", PASSWORD])
def test_password_file_first_line_is_the_password(
    env: dict[str, str], key: Path, out: Path, tmp_path: Path, content: str
) -> None:
    """As --help says: the first line is the password; the line end and later lines are not part of it."""
    pw = tmp_path / "password"
    pw.write_bytes(content.encode())
    iso = out / "ovf.iso"
    proc = ik(env, *iso_args(key, str(iso), "--password-file", str(pw), "--no-disable-password-auth"))
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    root = ET.fromstring(read_ovf_iso(iso, "udf"))
    assert root.findtext(f".//{WA_NS}UserPassword") == PASSWORD


def test_password_help_says_first_line(env: dict[str, str]) -> None:
    proc = ik(env, "--help", "iso")
    assert proc.returncode == 0
    assert "first line is the user's password" in " ".join(proc.stdout.split())


@pytest.mark.parametrize("first", ["Cli-Pa\x0bssw0rd!", "Cli-Pa\tssw0rd!", "Cli-Pa\x00ssw0rd!", "\rCli-Passw0rd!"])
def test_password_file_control_characters_in_the_first_line_are_refused(
    env: dict[str, str], key: Path, out: Path, tmp_path: Path, first: str
) -> None:
    pw = tmp_path / "password"
    pw.write_bytes((first + "\nsecond\n").encode())
    proc = ik(env, *iso_args(key, str(out / "ovf.iso"), "--password-file", str(pw), "--no-disable-password-auth"))
    refused(proc, "password: the password contains a control or invalid character", "allowed:")
    assert "Passw0rd" not in proc.stderr and "ssw0rd" not in proc.stderr
    assert tree(out) == []


# --- file sizes are checked before the files are read ---------------------------------------------------------

_RSS_WRAPPER = """
import json, resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True, stdin=subprocess.DEVNULL)
print(json.dumps({"rc": p.returncode, "stderr": p.stderr,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""
_RSS_LIMIT_KIB = 256 * 1024  # the CLI needs about 40 MiB; reading the 2 GiB file would need 2 GiB


@pytest.mark.parametrize(
    ("option", "expect"),
    [
        ("--custom-data", "custom_data: {path} is 2147483648 bytes, over the limit of 65535"),
        ("--password-file", "password_file: {path} is 2147483648 bytes, over the limit of 4096"),
        ("--ssh-key", "ssh_key: {path} is 2147483648 bytes, over the limit of 262144"),
    ],
)
def test_a_2_gib_input_file_is_refused_unread(
    env: dict[str, str], key: Path, out: Path, tmp_path: Path, option: str, expect: str
) -> None:
    big = tmp_path / "big"
    with big.open("wb") as fh:
        fh.truncate(2 << 30)  # sparse: takes no space, reads as 2 GiB of zeros
    args = iso_args(key, str(out / "ovf.iso"), option, str(big), "--no-disable-password-auth")
    wrapped = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, str(INVOKE), *args], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=300, check=True)
    res = json.loads(wrapped.stdout)
    proc = subprocess.CompletedProcess(args, res["rc"], "", res["stderr"])
    refused(proc, expect.format(path=big), "allowed:")
    assert res["maxrss_kib"] < _RSS_LIMIT_KIB, f"the CLI grew to {res['maxrss_kib']} KiB: it read the file"
    assert tree(out) == []


def test_custom_data_from_an_endless_device_is_refused_after_a_bounded_read(
    env: dict[str, str], key: Path, out: Path
) -> None:
    """/dev/zero has no size to stat: the read itself is bounded (65535 + 1 bytes)."""
    proc = ik(env, *iso_args(key, str(out / "ovf.iso"), "--custom-data", "/dev/zero"))
    refused(proc, "custom_data: /dev/zero holds more than 65535 bytes", "allowed:")
    assert tree(out) == []


def test_custom_data_one_byte_over_azures_limit(env: dict[str, str], key: Path, out: Path, tmp_path: Path) -> None:
    cd = tmp_path / "user-data"
    cd.write_bytes(b"#" * 65536)  # Azure: CustomData at most 65535 bytes before base64
    proc = ik(env, *iso_args(key, str(out / "ovf.iso"), "--custom-data", str(cd)))
    refused(proc, "65536 bytes, over the limit of 65535")
    assert tree(out) == []
    cd.write_bytes(b"#" * 65535)
    assert ik(env, *iso_args(key, str(out / "ovf.iso"), "--custom-data", str(cd))).returncode == 0


def test_provision_custom_data_is_size_checked_before_anything_starts(env: dict[str, str], tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as fh:
        fh.truncate(2 << 30)
    proc = ik(env, "provision", "--distro", "debian-12", "--custom-data", str(big))
    refused(proc, f"--custom-data: {big} is 2147483648 bytes, over the limit of 65535")
    assert not (tmp_path / "cache").exists()  # no base image, VM dir or run dir was started


# --- the boot benchmark -----------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["/nonexistent-dir/bench.json", "/tmp"])
def test_bench_output_that_cannot_be_written_is_refused_before_any_vm(env: dict[str, str], given: str) -> None:
    proc = ik(env, "bench", "--boot", "--output", given)
    refused(proc, "--output", "allowed: a file path in an existing directory")
    assert "plain" not in proc.stderr  # nothing booted


# --- VM sizes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["build", "check", "provision"])
@pytest.mark.parametrize(("option", "value", "expect"), [
    ("--cpus", "-1", "bad vCPU count -1"), ("--cpus", "65", "bad vCPU count 65"),
    ("--memory", "64", "bad guest memory 64 MiB"), ("--memory", "0", "bad guest memory 0 MiB"),
])
def test_vm_sizes_out_of_range_are_refused_before_any_vm(env: dict[str, str], task: str, option: str, value: str,
                                                        expect: str) -> None:
    proc = ik(env, task, "--distro", "debian-12", option, value)
    refused(proc, option, expect, "allowed:")
    assert "starting QEMU" not in proc.stderr
