"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class GaqError(Exception):
    """An error caused by input the user can fix; the message says what and how."""


class DivergedError(GaqError):
    """A computation on valid input produced NaN or infinite values (a calibration that
    diverged, a quantized model sampling NaN). It belongs to one benchmark cell, not to the
    sweep: the runner records the cell as failed and goes on with the others."""
