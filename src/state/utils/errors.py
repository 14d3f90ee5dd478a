"""The one error type users see.

Anything the user can fix (a missing file, a wrong column, a bad override) is raised as
:class:`StateError`. The CLI prints ``error: <message>`` on one line and exits with status 2;
the Python API lets it propagate like any exception.
"""

from __future__ import annotations


class StateError(Exception):
    """A user-facing problem with a one-line explanation and, ideally, the fix.

    Parameters
    ----------
    message
        What is wrong, naming the file / column / key / value involved.
    hint
        How to fix it; appended after the message as ``(fix: ...)``.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = " ".join(str(message).split())
        self.hint = " ".join(hint.split()) if hint else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        if self.hint:
            return f"{self.message} (fix: {self.hint})"
        return self.message


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception's message (or its type name when it has none).

    Library errors often carry multi-line messages or tracebacks; a user-facing error quotes one line.
    """
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if isinstance(exc, BaseException) else ""


def collect_errors(problems: list[str], *, context: str) -> None:
    """Raise one :class:`StateError` listing every problem found, or return if there are none."""
    if not problems:
        return
    if len(problems) == 1:
        raise StateError(f"{context}: {problems[0]}")
    raise StateError(f"{context}: " + "; ".join(problems))
