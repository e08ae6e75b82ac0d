"""One error root for the toolkit.

Library code raises subclasses of :class:`ImagekitError`; only the Invoke task layer turns them into a
message and an exit code. Every message says what was wrong and, where it can, what is allowed.
"""

from __future__ import annotations


class ImagekitError(Exception):
    """Base of every error the toolkit raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class ConfigError(ImagekitError):
    """A distro table entry or another configuration file is invalid."""


class InputError(ImagekitError):
    """A value given by the user (task option, file) is invalid."""


class CommandError(ImagekitError):
    """An external command failed; carries argv, exit code and the tail of its output."""

    def __init__(self, argv: list[str], returncode: int, stdout: str = "", stderr: str = "") -> None:
        import shlex

        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
        msg = f"command failed with exit code {returncode}: {shlex.join(argv)}"
        if tail:
            msg += "\n" + "\n".join("  | " + line for line in tail.splitlines())
        super().__init__(msg)


class HostError(ImagekitError):
    """The host lacks something the toolkit needs (a package, a device, permissions)."""


class BuildError(ImagekitError):
    """Building or capturing an image failed."""


class VMError(ImagekitError):
    """A virtual machine failed to start, crashed or did not reach the expected state."""

    def __init__(self, message: str, *, console_tail: str = "", hint: str | None = None) -> None:
        self.console_tail = console_tail
        if console_tail:
            message += "\n  serial console (tail):\n" + "\n".join(
                "  | " + line for line in console_tail.splitlines()[-40:]
            )
        super().__init__(message, hint=hint)


class ProvisioningError(VMError):
    """The guest agent reported a provisioning failure or did not provision in time."""


class CheckFailed(ImagekitError):
    """One or more checks failed."""
