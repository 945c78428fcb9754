"""The exit codes every ``chatfleet`` command uses, and the one way a command fails with a message.

A script that runs ``chatfleet kb upload`` or ``chatfleet simulate`` branches on the code, so each
code means the same thing in every command (docs/cli.md, "Exit codes"): 2 is typer's (click's) own
code for a usage error, and the others are chosen around it.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NoReturn

import typer
from rich.console import Console

__all__ = ["EXIT_CODES_HELP", "ExitCode", "fail"]


class ExitCode(IntEnum):
    OK = 0
    """Done."""
    REFUSED = 1
    """The server answered, and refused or failed the request, or only part of it was done (a
    partial upload); also a server whose answer was not what the command expects."""
    USAGE = 2
    """Nothing was done: fix the command line, the CHATFLEET_* configuration or an input file and
    run it again. typer's own code for a bad option or argument."""
    UNREACHABLE = 3
    """A server the command needs did not answer: connection refused, name not resolved, or no
    answer in time. ``serve``: the app did not start (uvicorn's code), e.g. the pgvector
    database it opens at start could not be reached."""


EXIT_CODES_HELP = ("Exit codes: 0 done; 1 the server refused or failed the request, or did only part "
                   "of it; 2 usage or configuration error, nothing done; 3 a server the command "
                   "needs did not answer (serve: start-up failed). See docs/cli.md.")
"""The ``chatfleet --help`` epilog."""

_stderr = Console(stderr=True, soft_wrap=True)
"""soft_wrap: a command to type stays on one line, however narrow the terminal or pipe."""


def fail(message: str, code: ExitCode) -> NoReturn:
    """Print ``message`` (what happened, then what to type) on stderr and exit with ``code``."""
    _stderr.print(message, style="red", markup=False, highlight=False)
    raise typer.Exit(int(code))
