"""One error type for user mistakes, reported as a single line by every entry point."""

from __future__ import annotations


class ImcapError(Exception):
    """A problem the user can fix (bad path, bad format, unknown option, missing weights).

    The message is one line that names the file, line or option and says what to do.
    Entry points print it without a traceback and exit with status 2.
    """

    def __init__(self, *args: object) -> None:
        # torch's DataLoader re-raises a worker's exception as its own type with the worker's
        # traceback in the message ("Caught ImcapError in DataLoader worker process 1.\nOriginal
        # Traceback ...\nimcap.errors.ImcapError: <message>"): keep the one line the user needs
        text = args[0] if len(args) == 1 else None
        if isinstance(text, str) and text.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            last = text.rstrip().rsplit("\n", 1)[-1]
            args = (last.split(": ", 1)[1] if ": " in last else last,)
        super().__init__(*args)
