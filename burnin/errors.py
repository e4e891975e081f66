"""One exception hierarchy for burnin.

User errors (a bad scenario, a bad flag, a missing privilege) are the user's to fix: the CLI prints
them as one line and exits with status 2. Harness errors are ours: something in burnin itself went
wrong, and the run is reported as `failed` with the reason.
"""

from __future__ import annotations

__all__ = [
    "short",
    "oneline",
    "reason",
    "BurninError",
    "UserError",
    "ScenarioError",
    "PrivilegeError",
    "HarnessError",
    "CheckpointError",
    "InjectedFault",
]


def short(value: object, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: an error message never echoes a huge value whole."""
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python converts
        return "(a number too long to show)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def oneline(value: object) -> str:
    """`value` as one printable line, whatever characters it holds."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(value))


def reason(exc: BaseException) -> str:
    """Why an operation failed, in a few printable words (an OSError's strerror, else its text)."""
    return oneline(getattr(exc, "strerror", None) or exc or type(exc).__name__)


class BurninError(Exception):
    """Base of every error burnin raises on purpose."""


class UserError(BurninError):
    """Bad input: the message names where it came from and how to fix it."""

    exit_code = 2


class ScenarioError(UserError):
    """A scenario file (or a flag overriding one) is invalid.

    Rendered as ``file:line: field: message`` so editors and CI logs can jump to it.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None, more: int = 0):
        self.file, self.line, self.field, self.message, self.more = file, line, field, message, more
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<scenario>"
        if self.line is not None:
            where += f":{self.line}"
        text = f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        if self.more:
            text += f" (and {self.more} more error{'s' if self.more > 1 else ''})"
        return text


class PrivilegeError(UserError):
    """The run needs a privilege or a tool this machine does not give (root, `ip`, CUDA)."""


class HarnessError(BurninError):
    """burnin itself failed: a bug or an environment problem, not the user's input."""


class CheckpointError(BurninError):
    """A checkpoint failed verification (checksum, truncation, missing file)."""


class InjectedFault(RuntimeError):
    """Raised inside a rank by the `process.exception` fault, so its origin is unmistakable."""
