"""One error type for user mistakes, reported as a single line by every entry point."""

from __future__ import annotations


class ImcapError(Exception):
    """A problem the user can fix (bad path, bad format, unknown option, missing weights).

    The message is one line that names the file, line or option and says what to do.
    Entry points print it without a traceback and exit with status 2.
    """
