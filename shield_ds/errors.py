"""User-facing errors: one line that names the offending thing (the ground floor: imports nothing of the
project). How a process reports one and exits is `shield_ds.process_group.exit_on_error`."""

from __future__ import annotations


class ShieldError(Exception):
    """An error caused by the user's input (files, flags, models); printed as one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for a
    one-line ShieldError about a library error that may span many lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
