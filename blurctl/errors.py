"""The error every user-facing failure becomes: one line, naming the field or file."""


class BlurctlError(Exception):
    """A failure the user can fix; the CLI prints its message on one line and exits non-zero."""

    exit_code = 1
