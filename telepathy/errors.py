"""The one error type users see: a one-line message naming the problem and the fix (exit code 2)."""


class UserError(Exception):
    """Bad input or configuration. The CLI prints `error: <message>` and exits 2, never a traceback."""

    exit_code = 2
