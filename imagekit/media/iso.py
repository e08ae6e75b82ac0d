"""The OVF provisioning ISO: ovf-env.xml on a DVD image shaped like the one Azure attaches.

Azure hands a new VM a UDF DVD holding ``/ovf-env.xml``; waagent mounts it with ``-t udf,iso9660`` and
cloud-init looks for ``TYPE=udf`` or ``TYPE=iso9660`` devices. The image written here carries the file in
all four pycdlib namespaces (ISO9660 level 3, Joliet, Rock Ridge, UDF 2.60), so either agent finds it
whichever filesystem the guest kernel picks, and ``blkid`` reports ``TYPE=udf`` as on Azure. (pycdlib's UDF
2.60 layout records revision 1.02 in its descriptors, so ``blkid`` prints ``VERSION=1.02``; the Linux udf
driver reads it either way. Azure's own UDF revision is not documented.) The volume id
``rd_rdfe_stable`` is the label Azure's media carry (cloud-init's ds-identify keys on the ``rd_rdfe`` prefix).

The ISO holds the password and custom data, so it is written 0600, through a temporary file in the target
directory that is renamed into place only when complete; on any error (also Ctrl-C) nothing is left.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

from imagekit.config.profile import ProvisioningProfile
from imagekit.core.errors import InputError
from imagekit.media.ovf import render_ovf_env

log = logging.getLogger(__name__)

VOLUME_ID = "rd_rdfe_stable"
OVF_FILE_NAME = "ovf-env.xml"

Namespace = Literal["iso9660", "joliet", "rr", "udf"]

#: Where the file lives in each namespace; ISO9660 names are upper case d-characters with a version.
OVF_PATHS: dict[str, str] = {
    "iso9660": "/OVF_ENV.XML;1",
    "joliet": "/" + OVF_FILE_NAME,
    "rr": "/" + OVF_FILE_NAME,
    "udf": "/" + OVF_FILE_NAME,
}


def build_iso_bytes(data: bytes) -> bytes:
    """Return an ISO image (bytes) holding ``data`` as ``/ovf-env.xml`` in every namespace."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", udf="2.60", vol_ident=VOLUME_ID)
    try:
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            OVF_PATHS["iso9660"],
            rr_name=OVF_FILE_NAME,
            joliet_path=OVF_PATHS["joliet"],
            udf_path=OVF_PATHS["udf"],
        )
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


#: Kernel pseudo-filesystems: writing an ISO there is never meant (and fails in odd ways: /proc says ENOENT).
_PSEUDO_FS_ROOTS = (Path("/proc"), Path("/sys"))
_OUTPUT_ALLOWED = "a file path in an existing, writable directory, such as out/ovf.iso (not a directory)"


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Check an ``--output`` path before anything is built; return it as a :class:`Path`.

    Refused, with :class:`InputError`: an empty path; one that ends in ``/`` or names an existing directory
    (the ISO is never written into a directory under a made-up name: say the file name); a file name longer
    than the file system allows (NAME_MAX, 255 bytes on Linux) or a path over PATH_MAX; a directory that does
    not exist or is not a directory; anything under /proc or /sys.
    """
    text = os.fspath(path)
    if not text:
        raise InputError("output: the path is empty", hint=f"allowed: {_OUTPUT_ALLOWED}")
    target = Path(text)
    dir_hint = f"allowed: {_OUTPUT_ALLOWED}, e.g. {target / 'ovf.iso'}"
    if text.endswith("/"):
        raise InputError(f"output: {text} ends in '/', so it names a directory; the ISO is written to a file "
                         "you name", hint=dir_hint)
    parent = target.parent
    resolved = parent.resolve()
    if any(resolved == root or root in resolved.parents for root in _PSEUDO_FS_ROOTS):
        raise InputError(f"output: {parent} is on a kernel pseudo-filesystem (/proc, /sys)",
                         hint=f"allowed: {_OUTPUT_ALLOWED}")
    try:
        if not parent.is_dir():
            what = "is not a directory" if parent.exists() else "does not exist"
            raise InputError(f"output: directory {parent} {what}", hint=f"allowed: {_OUTPUT_ALLOWED}")
    except OSError as exc:  # a component too long, a loop of symlinks, no permission to look
        raise InputError(f"output: cannot use directory {parent}: {exc.strerror or exc}",
                         hint=f"allowed: {_OUTPUT_ALLOWED}") from None
    name_max = _pathconf(parent, "PC_NAME_MAX", 255)
    name_len = len(os.fsencode(target.name))
    if name_len > name_max:
        raise InputError(f"output: the file name is {name_len} bytes, longer than the file system's limit of "
                         f"{name_max}", hint=f"allowed: {_OUTPUT_ALLOWED}, with a name of at most {name_max} bytes")
    path_max = _pathconf(parent, "PC_PATH_MAX", 4096)
    if len(os.fsencode(resolved / target.name)) >= path_max:
        raise InputError(f"output: the path is longer than the file system's limit of {path_max} bytes",
                         hint=f"allowed: {_OUTPUT_ALLOWED}")
    if target.is_dir():
        raise InputError(f"output: {text} is a directory; the ISO is written to a file you name", hint=dir_hint)
    return target


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(path, name)
    except (OSError, ValueError):
        return default
    return value if value > 0 else default


def write_ovf_iso(profile: ProvisioningProfile, path: str | os.PathLike[str]) -> Path:
    """Render ``profile`` and write the provisioning ISO to ``path`` (mode 0600, atomically).

    Returns the path written. Raises :class:`InputError` for a path :func:`check_output_path` refuses and
    when the file cannot be written there (read-only file system, no permission, no space); then nothing
    is left behind.
    """
    target = check_output_path(path)
    parent = target.parent
    image = build_iso_bytes(render_ovf_env(profile).encode("utf-8"))
    try:
        # A short temp name: the target's own name may already be near NAME_MAX.
        fd, tmp_name = tempfile.mkstemp(prefix=".ovf-iso.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise _cannot_write(target, exc) from None
    tmp = Path(tmp_name)
    try:
        # mkstemp already creates 0600; fchmod states the requirement regardless of umask or platform.
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(image)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(target, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info(
        "wrote provisioning ISO %s (%d bytes, hostname %s, user %s)",
        target,
        len(image),
        profile.hostname,
        profile.username,
    )
    return target


def _cannot_write(target: Path, exc: OSError) -> InputError:
    return InputError(f"output: cannot write {target}: {exc.strerror or exc}", hint=f"allowed: {_OUTPUT_ALLOWED}")


def read_ovf_iso(path: str | os.PathLike[str], namespace: Namespace = "udf") -> bytes:
    """Read ``ovf-env.xml`` back from an ISO through one pycdlib namespace (for tests and checks)."""
    import pycdlib

    if namespace not in OVF_PATHS:
        raise InputError(f"namespace: {namespace!r} is unknown", hint=f"allowed: {', '.join(OVF_PATHS)}")
    iso = pycdlib.PyCdlib()
    iso.open(os.fspath(path))
    try:
        out = io.BytesIO()
        key = {"iso9660": "iso_path", "joliet": "joliet_path", "rr": "rr_path", "udf": "udf_path"}[namespace]
        iso.get_file_from_iso_fp(out, **{key: OVF_PATHS[namespace]})
        return out.getvalue()
    finally:
        iso.close()


def iso_volume_id(path: str | os.PathLike[str]) -> str:
    """The ISO9660 primary volume descriptor's volume identifier (trailing padding removed)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open(os.fspath(path))
    try:
        raw = iso.pvd.volume_identifier
        return (raw.decode("ascii") if isinstance(raw, bytes) else str(raw)).rstrip()
    finally:
        iso.close()
