"""Errors that a job reports as one line and a non-zero exit, not a traceback."""


class UserError(Exception):
    """A problem the user can fix: a wrong path, an unknown encoder, an empty lake."""
