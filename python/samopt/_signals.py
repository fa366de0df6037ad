"""Ctrl-C between the native calls of one phase: ``InterruptHold`` defers it to the end.

A native call commits its whole phase before it returns, but a SAM variant's phase may be
several native calls and Python state updates in a row; a KeyboardInterrupt raised
between two of them would leave half a phase done. Python runs signal handlers only
between bytecodes, so replacing the SIGINT handler for the span of the phase is enough to
keep it whole.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

__all__ = ["InterruptHold"]

# The hold in force on the main thread (the outermost: those inside it do nothing).
_in_force: list[InterruptHold] = []


class InterruptHold:
    """``with InterruptHold():`` a SIGINT arriving inside the block is recorded, and
    raised as KeyboardInterrupt when the block ends (whether it ends normally or with an
    error). Only on the main thread (the only one Python runs handlers on) and only while
    the SIGINT handler is ``signal.default_int_handler``: a handler of the program's own is
    left alone, and a hold inside another hold does nothing. Never hold around user code:
    ``released()`` lets it be interrupted inside a hold."""

    def __init__(self) -> None:
        self._active = False
        self._interrupted = False

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._interrupted = True

    def __enter__(self) -> InterruptHold:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            signal.signal(signal.SIGINT, self._record)
            self._active = True
            _in_force.append(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._active:
            return
        # signal.signal runs the handlers of signals already received first: a SIGINT
        # from the block's last native call is recorded, not lost.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self._active = False
        _in_force.remove(self)
        if self._interrupted:
            self._interrupted = False
            raise KeyboardInterrupt

    @contextmanager
    def released(self) -> Iterator[None]:
        """Inside a hold, lets the block (user code) be interrupted as usual; a SIGINT
        the hold recorded before is raised on entry, as if it had come at that moment.
        Releases the hold in force, this one's or the one around it."""
        if threading.current_thread() is not threading.main_thread() or not _in_force:
            yield
            return
        hold = _in_force[-1]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            if hold._interrupted:
                hold._interrupted = False
                raise KeyboardInterrupt
            yield
        finally:
            signal.signal(signal.SIGINT, hold._record)
