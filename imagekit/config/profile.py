"""The provisioning profile: what Azure tells a new VM through ovf-env.xml.

A :class:`ProvisioningProfile` is checked when it is built, against the rules Azure's compute API applies to
``osProfile`` before it ever writes an ovf-env.xml, so a profile that exists is one Azure would accept:

- ``hostname`` (``computerName``): 1-64 characters, ASCII letters, digits, ``.`` and ``-``, starting with a
  letter or digit and not ending in ``.`` or ``-``. Dot-separated labels must be 1-63 characters, because
  the guest's hostname tools (systemd's ``hostnamectl``) refuse longer or empty labels.
- ``username`` (``adminUsername``): no upper case letters, none of ``\\/"[]:|<>+=;,?*@#()!``, not starting
  with ``$`` or ``-`` (Azure); not one of Azure's disallowed names (``root``, ``admin``, ``administrator``
  and the rest of :data:`AZURE_RESERVED_USERNAMES`). On top of that, what every endorsed distro's
  ``useradd`` accepts: the portable set ``a-z 0-9 . _ -``, not all digits, at most 32 characters; and not a
  built-in system account (:data:`LINUX_SYSTEM_USERNAMES`): such an account already exists on the image,
  so it is not created afresh, and waagent refuses to set a system account's password.
- ``ssh_public_keys``: OpenSSH public-key lines that parse (paramiko), of a type Azure accepts: RSA of at
  least 2048 bits, or Ed25519. With password authentication disabled at least one key is required.
- ``password`` (``adminPassword``, Linux): 6-72 characters, three of lower case, upper case, digit and
  special character (``[\\W_]``), not one of :data:`AZURE_DISALLOWED_PASSWORDS`, and no control characters
  (XML 1.0 cannot carry most of them, and parsers turn a carriage return into a line feed).
- ``custom_data``: at most 65535 bytes once decoded (Azure's limit), not empty.

Errors are :class:`~imagekit.core.errors.InputError` naming the field, what was wrong and what is allowed. The
password and custom data never appear in an error, a log line or the profile's ``repr``; neither does the
text of an SSH key file that did not parse (it might be a private key given by mistake).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from imagekit.core.errors import InputError

HOSTNAME_MAX = 64
HOSTNAME_LABEL_MAX = 63
USERNAME_MAX = 32
AZURE_USERNAME_MAX = 64
PASSWORD_MIN = 6
PASSWORD_MAX = 72
CUSTOM_DATA_MAX = 65535
#: Size limits of the files named on the command line, checked before they are read: a password file
#: holds one line of at most 72 characters (4 bytes each in UTF-8) plus whatever follows it; a key file a
#: few dozen public keys (an RSA-16384 key line is under 3 KiB).
PASSWORD_FILE_MAX = 4096
KEY_FILE_MAX = 256 * 1024
RSA_MIN_BITS = 2048

#: Azure's disallowed ``adminUsername`` values (compute REST API, ``OSProfile.adminUsername``); compared
#: case-insensitively, as Azure does.
AZURE_RESERVED_USERNAMES = frozenset(
    {
        "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1", "123",
        "a", "actuser", "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john", "owner",
        "root", "server", "sql", "support", "support_388945a0", "sys", "test2", "test3", "user4", "user5",
    }
)  # fmt: skip

#: Built-in system accounts of the endorsed distros (Azure's "Selecting user names for Linux" lists for
#: CentOS/RHEL, SLES/openSUSE and Ubuntu, plus Debian's base-passwd and systemd's static users). The user
#: already exists on the image, so the agent does not create it afresh, and waagent refuses to set the
#: password of an account below UID_MIN: provisioning with one of these fails or hands out a system account.
LINUX_SYSTEM_USERNAMES = frozenset(
    {
        "abrt", "adm", "admin", "audio", "backup", "bin", "cdrom", "cgred", "console", "crontab", "daemon",
        "dbus", "dialout", "dip", "disk", "fax", "floppy", "ftp", "fuse", "games", "gnats", "gopher",
        "haldaemon", "halt", "irc", "kmem", "landscape", "libuuid", "list", "lock", "lp", "mail", "maildrop",
        "man", "mem", "messagebus", "mlocate", "modem", "netdev", "news", "nfsnobody", "nobody", "nogroup",
        "ntp", "operator", "oprofile", "plugdev", "polkituser", "postdrop", "postfix", "proxy", "public",
        "qpidd", "root", "rpc", "rpcuser", "sasl", "saslauth", "shadow", "shutdown", "slocate", "src", "ssh",
        "sshd", "staff", "stapdev", "stapusr", "sudo", "sync", "sys", "syslog", "tape", "tcpdump", "trusted",
        "tty", "users", "utempter", "utmp", "uucp", "uuidd", "vcsa", "video", "voice", "wheel", "whoopsie",
        "www", "www-data", "systemd-network", "systemd-resolve", "systemd-timesync", "systemd-coredump",
        "_apt", "polkitd", "chrony", "tss",
    }
)  # fmt: skip

#: Azure's disallowed ``adminPassword`` values (compute REST API, ``OSProfile.adminPassword``).
AZURE_DISALLOWED_PASSWORDS = frozenset(
    {
        "abc@123", "P@$$w0rd", "P@ssw0rd", "P@ssword123", "Pa$$word", "pass@word1", "Password!",
        "Password1", "Password22", "iloveyou!",
    }
)  # fmt: skip

#: Key types Azure accepts for Linux VMs, as OpenSSH names them.
ACCEPTED_KEY_TYPES = ("ssh-rsa", "ssh-ed25519")

_HOSTNAME_CHARS = re.compile(r"[A-Za-z0-9.-]+")
_AZURE_USERNAME_FORBIDDEN = re.compile(r'[\\/"\[\]:|<>+=;,?*@#()!]')
_PORTABLE_USERNAME = re.compile(r"[a-z0-9._-]+")
_SPECIAL = re.compile(r"[\W_]")


def _fail(field_name: str, problem: str, allowed: str) -> InputError:
    return InputError(f"{field_name}: {problem}", hint=f"allowed: {allowed}")


# --- SSH public keys ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshPublicKey:
    """One parsed OpenSSH public key (``type base64 [comment]``)."""

    key_type: str
    blob: bytes
    bits: int
    comment: str = ""

    @property
    def openssh(self) -> str:
        """The key as one authorized_keys line, normalised (single spaces, no options)."""
        line = f"{self.key_type} {base64.b64encode(self.blob).decode('ascii')}"
        return f"{line} {self.comment}" if self.comment else line

    @property
    def fingerprint(self) -> str:
        """SHA-1 over the key blob in upper case hex: the 40-digit thumbprint shape ovf-env.xml carries."""
        return hashlib.sha1(self.blob, usedforsecurity=False).hexdigest().upper()

    @property
    def sha256(self) -> str:
        """OpenSSH's ``SHA256:...`` fingerprint, for logs and messages."""
        digest = base64.b64encode(hashlib.sha256(self.blob).digest()).decode("ascii").rstrip("=")
        return f"SHA256:{digest}"


def parse_ssh_public_key(text: str, *, where: str = "ssh_public_keys") -> SshPublicKey:
    """Parse one OpenSSH public key line with paramiko and check that Azure accepts its type and size.

    ``where`` names the key in errors (for example ``ssh_public_keys[0]`` or a file name). The key text is
    never quoted back: a private key pasted by mistake must not end up in a terminal or log.
    """
    import paramiko

    allowed = (
        "an OpenSSH public key line 'ssh-rsa AAAA... [comment]' (RSA, at least 2048 bits) "
        "or 'ssh-ed25519 AAAA... [comment]'"
    )
    if not isinstance(text, str):
        raise _fail(where, f"expected the key as text, got {type(text).__name__}", allowed)
    line = text.strip()
    if not line:
        raise _fail(where, "the key is empty", allowed)
    if "PRIVATE KEY" in line:
        raise _fail(where, "this is a private key; give the public key (the .pub file)", allowed)
    if "\n" in line or "\r" in line:
        raise _fail(where, "more than one line; give one key per entry", allowed)
    parts = line.split(None, 2)
    key_type = parts[0]
    if key_type not in ACCEPTED_KEY_TYPES:
        known = key_type.startswith(("ssh-", "ecdsa-", "sk-")) and len(key_type) < 64
        shown = f"key type {key_type!r}" if known else "the line does not start with a key type"
        raise _fail(where, f"{shown} is not accepted by Azure", allowed)
    if len(parts) < 2:
        raise _fail(where, "the base64 key data is missing", allowed)
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise _fail(where, "the key data is not valid base64", allowed) from None
    comment = parts[2] if len(parts) == 3 else ""
    if any(unicodedata.category(c) == "Cc" for c in comment):
        raise _fail(where, "the comment contains control characters", allowed)
    try:
        pkey = paramiko.PKey.from_type_string(key_type, blob)
    except Exception:  # paramiko raises SSHException, ValueError, struct/index errors on bad blobs
        raise _fail(where, f"the {key_type} key data does not parse", allowed) from None
    bits = pkey.get_bits()
    if key_type == "ssh-rsa" and bits < RSA_MIN_BITS:
        raise _fail(where, f"RSA key of {bits} bits is too short for Azure", allowed)
    return SshPublicKey(key_type=key_type, blob=blob, bits=bits, comment=comment)


# --- the other fields -----------------------------------------------------------------------------


def validate_hostname(hostname: str) -> None:
    allowed = (
        f"1-{HOSTNAME_MAX} characters of A-Z a-z 0-9 '.' '-', starting with a letter or digit, not ending "
        f"in '.' or '-', dot-separated labels of 1-{HOSTNAME_LABEL_MAX} characters"
    )
    if not isinstance(hostname, str) or not hostname:
        raise _fail("hostname", "the hostname is empty", allowed)
    if len(hostname) > HOSTNAME_MAX:
        raise _fail("hostname", f"{len(hostname)} characters is longer than Azure's {HOSTNAME_MAX}", allowed)
    if not _HOSTNAME_CHARS.fullmatch(hostname):
        bad = sorted({c for c in hostname if not _HOSTNAME_CHARS.fullmatch(c)})
        raise _fail("hostname", f"{hostname!r} contains characters Azure refuses: {''.join(bad)!r}", allowed)
    if not hostname[0].isalnum():
        raise _fail("hostname", f"{hostname!r} must start with a letter or digit", allowed)
    if hostname[-1] in ".-":
        raise _fail("hostname", f"{hostname!r} must not end in {hostname[-1]!r}", allowed)
    for label in hostname.split("."):
        if not label:
            raise _fail("hostname", f"{hostname!r} has an empty label ('..')", allowed)
        if len(label) > HOSTNAME_LABEL_MAX:
            raise _fail("hostname", f"label {label[:20]!r}... is longer than {HOSTNAME_LABEL_MAX}", allowed)


def validate_username(username: str) -> None:
    allowed = (
        f"1-{USERNAME_MAX} characters of a-z 0-9 '.' '_' '-', starting with a letter, digit or '_', not all "
        "digits, and not a name Azure reserves (root, admin, administrator, ...) or a Linux system account"
    )
    if not isinstance(username, str) or not username:
        raise _fail("username", "the username is empty", allowed)
    shown = repr(username[:40])
    if len(username) > AZURE_USERNAME_MAX:
        raise _fail("username", f"{len(username)} characters is longer than Azure's {AZURE_USERNAME_MAX}", allowed)
    if len(username) > USERNAME_MAX:
        raise _fail("username", f"{len(username)} characters is longer than useradd's limit of {USERNAME_MAX}", allowed)
    if any(c.isupper() for c in username):
        raise _fail("username", f"{shown} contains upper case letters, which Azure refuses for Linux", allowed)
    bad = sorted(set(_AZURE_USERNAME_FORBIDDEN.findall(username)))
    if bad:
        raise _fail("username", f"{shown} contains characters Azure refuses: {''.join(bad)!r}", allowed)
    if username[0] in "$-":
        raise _fail("username", f"{shown} must not start with {username[0]!r} (Azure)", allowed)
    if not _PORTABLE_USERNAME.fullmatch(username):
        bad = sorted({c for c in username if not _PORTABLE_USERNAME.fullmatch(c)})
        raise _fail("username", f"{shown} contains characters useradd refuses: {''.join(bad)!r}", allowed)
    if username[0] == ".":
        raise _fail("username", f"{shown} must not start with '.'", allowed)
    if username.lower() in AZURE_RESERVED_USERNAMES:
        raise _fail("username", f"{shown} is a name Azure reserves and refuses", allowed)
    if username.isdigit():
        raise _fail("username", f"{shown} is all digits, which useradd refuses (it reads as a UID)", allowed)
    if username in LINUX_SYSTEM_USERNAMES:
        raise _fail("username", f"{shown} is a built-in Linux system account; provisioning it fails on the VM", allowed)


def validate_password(password: str) -> None:
    """Check Azure's Linux ``adminPassword`` rules. Messages never contain the password or parts of it."""
    allowed = (
        f"{PASSWORD_MIN}-{PASSWORD_MAX} characters with three of: a lower case letter, an upper case letter, "
        "a digit, a special character; no control characters; not one of Azure's disallowed passwords"
    )
    if not isinstance(password, str):
        raise _fail("password", f"expected text, got {type(password).__name__}", allowed)
    if len(password) < PASSWORD_MIN:
        raise _fail("password", f"the password is shorter than {PASSWORD_MIN} characters", allowed)
    if len(password) > PASSWORD_MAX:
        raise _fail("password", f"the password is longer than {PASSWORD_MAX} characters", allowed)
    if password in AZURE_DISALLOWED_PASSWORDS:
        raise _fail("password", "the password is one of Azure's disallowed passwords", allowed)
    if any(unicodedata.category(c) in ("Cc", "Cs") or c in "\ufffe\uffff" for c in password):
        raise _fail("password", "the password contains a control or invalid character", allowed)
    classes = (
        any(c.islower() for c in password),
        any(c.isupper() for c in password),
        any(c.isdecimal() for c in password),
        _SPECIAL.search(password) is not None,
    )
    if sum(classes) < 3:
        names = ("lower case", "upper case", "digit", "special")
        missing = ", ".join(n for n, present in zip(names, classes, strict=True) if not present)
        raise _fail("password", f"the password is not complex enough (it lacks: {missing})", allowed)


def validate_custom_data(custom_data: bytes) -> None:
    allowed = f"1-{CUSTOM_DATA_MAX} bytes (Azure's limit, before base64 encoding)"
    if not isinstance(custom_data, bytes):
        raise _fail("custom_data", f"expected bytes, got {type(custom_data).__name__}", allowed)
    if not custom_data:
        raise _fail("custom_data", "the custom data is empty; leave it out instead", allowed)
    if len(custom_data) > CUSTOM_DATA_MAX:
        raise _fail("custom_data", f"{len(custom_data)} bytes is over Azure's limit", allowed)


# --- the profile ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProvisioningProfile:
    """What ovf-env.xml tells the VM. Validated on construction: an instance is always one Azure accepts.

    ``ssh_public_keys`` holds OpenSSH public-key lines; the parsed forms are in :attr:`ssh_keys`.
    """

    hostname: str
    username: str
    ssh_public_keys: tuple[str, ...]
    password: str | None = field(default=None, repr=False)
    custom_data: bytes | None = field(default=None, repr=False)
    disable_password_auth: bool = True
    provision_guest_agent: bool = True
    ssh_keys: tuple[SshPublicKey, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.ssh_public_keys, str):
            # A bare string would otherwise be iterated character by character.
            object.__setattr__(self, "ssh_public_keys", (self.ssh_public_keys,))
        elif not isinstance(self.ssh_public_keys, tuple):
            object.__setattr__(self, "ssh_public_keys", tuple(self.ssh_public_keys))
        self.validate()

    def validate(self) -> None:
        """Check every field against Azure's rules; raise :class:`InputError` on the first problem."""
        validate_hostname(self.hostname)
        validate_username(self.username)
        for name in ("disable_password_auth", "provision_guest_agent"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, f"expected true or false, got {type(getattr(self, name)).__name__}", "a bool")
        keys = tuple(parse_ssh_public_key(k, where=f"ssh_public_keys[{i}]") for i, k in enumerate(self.ssh_public_keys))
        object.__setattr__(self, "ssh_keys", keys)
        if self.password is not None:
            validate_password(self.password)
        if self.custom_data is not None:
            validate_custom_data(self.custom_data)
        if self.disable_password_auth and not keys:
            raise _fail(
                "ssh_public_keys",
                "password authentication is disabled but no SSH public key was given",
                "at least one SSH public key, or a password with password authentication enabled",
            )
        if not keys and self.password is None:
            raise _fail("ssh_public_keys", "neither an SSH public key nor a password was given", "at least one")

    @classmethod
    def create(
        cls,
        *,
        hostname: str,
        username: str,
        ssh_public_keys: Iterable[str] = (),
        password: str | None = None,
        custom_data: bytes | None = None,
        disable_password_auth: bool = True,
        provision_guest_agent: bool = True,
    ) -> ProvisioningProfile:
        """Build a validated profile from values (keyword arguments only)."""
        return cls(
            hostname=hostname,
            username=username,
            ssh_public_keys=tuple(ssh_public_keys),
            password=password,
            custom_data=custom_data,
            disable_password_auth=disable_password_auth,
            provision_guest_agent=provision_guest_agent,
        )

    @classmethod
    def from_files(
        cls,
        *,
        hostname: str,
        username: str,
        ssh_key_files: Iterable[str | Path] = (),
        password_file: str | Path | None = None,
        custom_data_file: str | Path | None = None,
        disable_password_auth: bool = True,
        provision_guest_agent: bool = True,
    ) -> ProvisioningProfile:
        """Build a validated profile from files, as the ``iso`` task does.

        A key file holds one or more public-key lines (blank lines and ``#`` comments are skipped). The
        password file holds the password on its first line; the line ending (``\\n`` or ``\\r\\n``) and any
        later lines are ignored. Each file is size-checked before it is read (:func:`read_input_file`):
        custom data up to Azure's 65535 bytes, a password file up to 4 KiB, a key file up to 256 KiB.
        """
        keys: list[str] = []
        for kf in ssh_key_files:
            text = _read_text(Path(kf), "ssh_key", KEY_FILE_MAX)
            lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            if not lines:
                raise _fail(f"ssh_key {kf}", "the file holds no key", "an OpenSSH public key file (.pub)")
            for i, ln in enumerate(lines):
                keys.append(parse_ssh_public_key(ln, where=f"ssh_key {kf} (key {i + 1})").openssh)
        password = None
        if password_file is not None:
            raw = _read_text(Path(password_file), "password_file", PASSWORD_FILE_MAX)
            # The first line (up to the first line feed, without a trailing carriage return) is the
            # password; later lines are ignored. Other control characters stay in and are refused.
            first = raw.split("\n", 1)[0]
            password = first[:-1] if first.endswith("\r") else first
        custom_data = None
        if custom_data_file is not None:
            custom_data = read_input_file(Path(custom_data_file), "custom_data", CUSTOM_DATA_MAX,
                                          f"a file of 1-{CUSTOM_DATA_MAX} bytes (Azure's CustomData limit)")
        return cls.create(
            hostname=hostname,
            username=username,
            ssh_public_keys=keys,
            password=password,
            custom_data=custom_data,
            disable_password_auth=disable_password_auth,
            provision_guest_agent=provision_guest_agent,
        )

    @property
    def custom_data_b64(self) -> str | None:
        """CustomData as ovf-env.xml carries it: base64 (cloud-init decodes it; waagent stores it as is)."""
        return None if self.custom_data is None else base64.b64encode(self.custom_data).decode("ascii")

    @property
    def authorized_keys_path(self) -> str:
        """The key path ovf-env.xml gives; waagent expands ``$HOME`` to ``/home``."""
        return f"$HOME/{self.username}/.ssh/authorized_keys"


def read_input_file(path: Path, field_name: str, limit: int, allowed: str = "") -> bytes:
    """Read a file the user named on the command line, refusing it unread when it is over ``limit`` bytes.

    The size is checked twice: ``fstat`` of the open file (a 2 GiB file is refused without reading a byte of
    it), and a read of at most ``limit + 1`` bytes (for pipes, ``/dev/zero`` and files that grow), so
    memory stays bounded whatever the path names.
    """
    allowed = allowed or f"a readable file of at most {limit} bytes"
    try:
        with path.open("rb", buffering=0) as fh:
            st = os.fstat(fh.fileno())
            if stat.S_ISREG(st.st_mode) and st.st_size > limit:
                raise _fail(field_name, f"{path} is {st.st_size} bytes, over the limit of {limit}", allowed)
            data = fh.read(limit + 1)
            # A raw read may return less than asked before the end (pipes): read on up to the limit.
            while data is not None and len(data) <= limit:
                more = fh.read(limit + 1 - len(data))
                if not more:
                    break
                data += more
    except OSError as exc:
        raise _fail(field_name, f"cannot read {path}: {exc.strerror or exc}", allowed) from None
    data = data or b""
    if len(data) > limit:
        raise _fail(field_name, f"{path} holds more than {limit} bytes", allowed)
    return data


def _read_text(path: Path, field_name: str, limit: int) -> str:
    data = read_input_file(path, field_name, limit, f"a UTF-8 text file of at most {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(field_name, f"{path} is not UTF-8 text", "a UTF-8 text file") from None


