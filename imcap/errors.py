"""One error type for user mistakes, reported as a single line by every entry point."""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

# what Ctrl-C says where nothing more fitting is known (`on_ctrl_c` says more)
RUN_AGAIN = "run the same command again to continue (a feature cache resumes where it stopped)"


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


class Interrupted(BaseException):
    """Ctrl-C inside `on_ctrl_c(advice)`; its one argument is the advice.

    Not a KeyboardInterrupt: Lightning ends a stage on a KeyboardInterrupt with exit status 1
    and a message of its own, whereas anything else it raises again after tearing the stage
    down, so that the advice reaches `report_user_errors`.
    """


@contextlib.contextmanager
def on_ctrl_c(advice: str) -> Iterator[None]:
    """Inside, Ctrl-C ends the command with `error: interrupted (Ctrl-C); <advice>` and exit
    status 130, where running the same command again would redo finished work (testing after
    training: the same command trains again from scratch). Only in the main thread, the one
    that receives signals; elsewhere it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(advice)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def user_error(exc: BaseException) -> ImcapError | None:
    """The ImcapError that `exc` is, or that Hydra wrapped while instantiating; None for a bug.

    Only the explicit cause of Hydra's InstantiationException is followed: an exception raised
    while an ImcapError was being handled (its `__context__`) is a bug, not that error.
    """
    # looked up, not imported: an entry point that never loaded Hydra (imcap.score) meets none of its errors
    hydra_errors = sys.modules.get("hydra.errors")
    wrapper = hydra_errors.InstantiationException if hydra_errors is not None else ()
    seen: BaseException | None = exc
    while wrapper and isinstance(seen, wrapper):
        seen = seen.__cause__
    return seen if isinstance(seen, ImcapError) else None


def end_progress_bars() -> None:
    """Close the tqdm progress bars still open (each leaves its last state and a newline, or
    clears its line), so that an error line printed next starts on a line of its own instead of
    at the end of a bar's. Rich's bars are stopped by Lightning's RichProgressBar itself."""
    tqdm = sys.modules.get("tqdm.std")  # looked up, not imported: no bar was made without it
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


def report_user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user mistakes (ImcapError) into `error: <one line>` on stderr and exit status 2;
    anything else is a bug: its full traceback, exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, Interrupted) as stop:  # Ctrl-C outside training, which saves
            # and says how to resume itself; a `signum` attribute names another signal (SIGTERM: 143)
            end_progress_bars()
            advice = stop.args[0] if isinstance(stop, Interrupted) else RUN_AGAIN
            signum = getattr(stop, "signum", signal.SIGINT)
            how = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"error: interrupted ({how}); {advice}", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum) from None
        except Exception as exc:
            end_progress_bars()
            user = user_error(exc)
            if user is None:  # a bug: the whole traceback (Hydra would print one line for
                # an error inside a constructor it builds), exit status 1
                traceback.print_exc()
                raise SystemExit(1) from None
            print(f"error: {user}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper
