"""Errors a user can cause and fix. The CLI prints their message on one line and exits 2."""


class DDKError(Exception):
    """A problem with the user's input (path, data, config, models); the message says what to fix."""


class ConfigError(DDKError, ValueError):
    """A problem a user can fix in the configuration; the message names the YAML path.
    (Also a ValueError, as it was before it joined DDKError.)"""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
