"""The one exception type for a user's mistake: the CLI prints it as one line and exits with 2."""


class UserError(Exception):
    """Bad input from the user (config value, path, missing data); never shown as a traceback."""


class Diverged(UserError):
    """Training met a non-finite loss or gradient and stopped before applying it: one line, exit 1."""

    exit_code = 1
