"""User-facing errors.

Every error a user can cause (bad file, missing data, unavailable device) is raised as a
``UserError`` whose message is one line naming the file or setting and the fix. The CLI prints it
as ``distbert: error: <message>`` and exits with status 2; nothing else is printed.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input or environment, reported as one line without a traceback."""

    def __init__(self, message: str) -> None:
        if "\n" in message:
            raise ValueError("UserError messages must be one line")
        super().__init__(message)
