"""User-facing errors: one line that names the offending thing (the ground floor: imports nothing of the
project). How a process reports one and exits is `shield_ds.process_group.exit_on_error`; `ToolParser` is here so
that a tool's `--help` and usage errors need neither torch nor DeepSpeed."""

from __future__ import annotations

import argparse
import sys
import typing


class ShieldError(Exception):
    """An error caused by the user's input (files, flags, models); printed as one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for a
    one-line ShieldError about a library error that may span many lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ToolParser(argparse.ArgumentParser):
    """The argument parser of the tools and scripts (`python -m shield_ds....`, benchmarks/, selfcheck): a
    usage error is one line naming the tool, exit 2, not argparse's usage block. Subcommands inherit it.
    Parsing happens before any process group starts, so there is none to end here."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr, flush=True)
        sys.exit(2)

