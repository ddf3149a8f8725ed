"""Errors a user can cause and fix. The CLI prints their message on one line and exits 2."""


class DDKError(Exception):
    """A problem with the user's input (path, data, config, models); the message says what to fix."""
