"""The error every user-facing failure becomes: one line, naming the field or file."""


class BlurctlError(Exception):
    """A failure the user can fix; the CLI prints its message on one line and exits non-zero."""

    exit_code = 1


class InputError(BlurctlError):
    """Bad input (a recipe value, a file, a corpus) found before any work was done."""

    exit_code = 2
