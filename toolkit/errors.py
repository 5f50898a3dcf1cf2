"""The one error type users see: a problem with their input, reported in one line with exit code 2."""


class UserError(Exception):
    """Bad input or an impossible request.

    The message names the problem and the fix. The CLI prints it as one line, without a traceback, and exits
    with code 2. Raise it only before anything is written, or after making sure nothing written is lost.
    """

    exit_code = 2
