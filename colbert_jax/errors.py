"""Errors that say what to type: the library names its Python argument, the command line its flag.

An exception may carry a `cli_message` attribute: the same complaint with the command-line flag in place of
the keyword argument. `colbert-jax` prints it when present.
"""

from __future__ import annotations

__all__ = ["OptionRequired", "needs_option", "cli_message"]


class OptionRequired(ValueError):
    """An operation that is refused unless the caller opts in with an argument (or flag)."""


def needs_option(error: type[Exception], message: str, *, argument: str, flag: str, purpose: str) -> Exception:
    """`error(message; pass ARGUMENT to PURPOSE)` with a `cli_message` naming FLAG instead."""
    exc = error(f"{message}; pass {argument} to {purpose}")
    exc.cli_message = f"{message}; add {flag} to {purpose}"
    return exc


def cli_message(exc: BaseException) -> str:
    """The message to show on the command line."""
    return getattr(exc, "cli_message", None) or str(exc)
