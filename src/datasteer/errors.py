"""Error types. Every user-facing failure is a `DatasteerError` whose message is one readable paragraph."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DatasteerError(Exception):
    """A failure caused by the user's input; the CLI prints it without a traceback and exits with 2."""


class ConfigError(DatasteerError):
    """A configuration key, value, component or file is wrong."""


class NonFiniteLossError(DatasteerError):
    """A training loss became NaN or inf: the run stops before the step is observed, decided on or saved."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return " Did you mean 'x'?" for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_choice(what: str, name: str, choices: Iterable[str], where: str = "") -> ConfigError:
    """Build the standard "unknown X" error that lists the valid choices and the closest match."""
    choices = sorted(choices)
    loc = f" in {where}" if where else ""
    return ConfigError(
        f"Unknown {what} '{name}'{loc}.{did_you_mean(name, choices)} Valid choices: {', '.join(choices)}."
    )


MAX_ECHO = 200  # characters of a user's value quoted in an error
MAX_PARAGRAPH = 4000  # characters of one error paragraph


def short(value: object, limit: int = MAX_ECHO) -> str:
    """`repr(value)`, cut to `limit` characters with the length said: an error never echoes a megabyte value
    (a YAML alias bomb, a pasted document) back at the user."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def short_paragraph(text: str, limit: int = MAX_PARAGRAPH) -> str:
    """The last guard on an error paragraph: its length, for values echoed by code that does not use `short`, and
    characters no terminal can print (the surrogates standing for command-line bytes that are not UTF-8)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else f"{text[:limit]}... (message cut: {len(text)} characters)"
