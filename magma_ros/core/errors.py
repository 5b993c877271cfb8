"""User-facing errors: one line that names the bad value and the valid choices."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A user mistake (unknown name, missing file, malformed YAML).

    Entry points print ``str(err)`` as one line and exit with status 2; no traceback.
    """


def choose(value: str, valid: Iterable[str], what: str) -> str:
    """Return ``value`` if it is one of ``valid``; otherwise raise a one-line ConfigError.

    >>> choose("fr3", ["fr3", "panda"], "robot")
    'fr3'
    """
    valid = list(valid)
    if value in valid:
        return value
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"unknown {what} '{value}'{hint}; valid: {', '.join(valid)}")
