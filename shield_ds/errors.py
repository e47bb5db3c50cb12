"""User-facing errors: one line that names the offending thing, and a non-zero exit."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import typing
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class ShieldError(Exception):
    """An error caused by the user's input (files, flags, models); printed as one line."""


def exit_with_error(message: str) -> typing.NoReturn:
    """Print `error: MESSAGE` on stderr (one line) and exit with code 2 (ending this rank's process group
    first when one is up, `_end_distributed`)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    _end_distributed(2, together=False)
    sys.exit(2)


class ToolParser(argparse.ArgumentParser):
    """The argument parser of the tools and scripts (`python -m shield_ds....`, benchmarks/, selfcheck): a
    usage error is one line naming the tool, exit 2, not argparse's usage block. Subcommands inherit it."""

    def error(self, message: str) -> typing.NoReturn:
        exit_with_error(f"{self.prog}: {message}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for a
    one-line ShieldError about a library error that may span many lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def exit_on_error(fn: F) -> F:
    """Decorate a recipe's main(): a ShieldError becomes `error: ...` on stderr and exit code 2; a
    distributed recipe that returns ends its ranks together (`shield_ds.engine.exit_distributed`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except ShieldError as exc:
            logging.getLogger("shield_ds").debug("user error", exc_info=True)
            exit_with_error(str(exc))
        _end_distributed(0, together=True)  # a distributed recipe's ranks end together here
        return result

    return wrapper  # type: ignore[return-value]


def _end_distributed(code: int, *, together: bool) -> None:
    """`shield_ds.engine.exit_distributed` when this process started a process group (it skips the
    interpreter's teardown, where gloo's threads can abort an exiting rank); a no-op otherwise, without
    importing DeepSpeed."""
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is None or not torch_dist.is_available() or not torch_dist.is_initialized():
        return
    from shield_ds.engine import exit_distributed

    exit_distributed(code, together=together)
