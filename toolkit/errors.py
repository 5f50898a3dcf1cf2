"""The one error type users see: a problem with their input, reported in one line with exit code 2."""


class UserError(Exception):
    """Bad input or an impossible request.

    The message names the problem and the fix. The CLI prints it as one line, without a traceback, and exits
    with code 2. Raise it only before anything is written, or after making sure nothing written is lost.
    """

    exit_code = 2


def unexpected(e: BaseException) -> str:
    """One line for an error that no check foresaw: its type, message and the innermost toolkit frame it passed,
    and what to do (``--debug`` shows the traceback)."""
    import os
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f"{os.sep}toolkit{os.sep}" in f.filename] or frames
    place = f" ({os.path.basename(ours[-1].filename)}:{ours[-1].lineno})" if ours else ""
    message = " ".join(str(e).split())[:300]
    return (f"unexpected {type(e).__name__}: {message}{place}; check the inputs it names, rerun with --debug for "
            f"the traceback, and report it if the inputs are fine")
