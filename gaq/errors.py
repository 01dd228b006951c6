"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class GaqError(Exception):
    """An error caused by input the user can fix; the message says what and how."""
