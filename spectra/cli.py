"""Shared plumbing of the standalone scripts in ``scripts/``: bad input becomes one line and exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (no usage block) with exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_script(parser: argparse.ArgumentParser, work: Callable[[argparse.Namespace], int | None],
               argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run ``work(args)``; ValueError/OSError -> one line on stderr, exit 2."""
    args = parser.parse_args(argv)
    try:
        return int(work(args) or 0)
    except (ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def command_script(prog: str, module: str, argv: list[str] | None = None) -> int:
    """A ``scripts/`` wrapper: the options and work of the ``nanosil`` subcommand ``module``
    (``add_arguments``, ``run``, ``DESCRIPTION``) under the script's own name."""
    import importlib

    command = importlib.import_module(module)
    parser = OneLineParser(prog=prog, description=command.DESCRIPTION)
    command.add_arguments(parser)
    return run_script(parser, command.run, argv)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return " ".join(text.split())
