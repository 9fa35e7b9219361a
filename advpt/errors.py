"""What the user can fix: the CLI prints each of these as one line and exits with its code (2 unless set)."""


class UserError(Exception):
    """Bad input from the user (config value, path, missing data); never shown as a traceback."""


class Diverged(UserError):
    """Training met a non-finite loss or gradient and stopped before applying it: one line, exit 1."""

    exit_code = 1


class DiskFull(UserError):
    """A file of the run could not be written: its file system is full, over quota or read-only.
    One line naming the file and the space left, exit 74 (sysexits' EX_IOERR), nothing half-written."""

    exit_code = 74

    def __init__(self, message: str, read_only: bool = False) -> None:
        super().__init__(message)
        self.read_only = read_only  # room will not help: the folder must change


class FolderInUse(UserError):
    """Another live run holds the run directory: one line naming it, exit 75 (sysexits' EX_TEMPFAIL:
    the same command succeeds once that run has ended), nothing written."""

    exit_code = 75
