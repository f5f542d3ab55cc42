"""Ctrl-C in the train loop: stop at a step boundary, where a checkpoint can be written.

Used by :func:`metajax.run.loop.train`; the CLI turns :class:`Interrupted` into one line
and exit code 130.
"""

from __future__ import annotations

import signal
import threading


class Interrupted(RuntimeError):
    """The run was stopped by SIGINT; the message says where it resumes (the CLI exits 130)."""


class StopRequest:
    """While active (main thread only), the first SIGINT after a finished step asks the
    loop to stop at the next step boundary, where a checkpoint is written; before the
    first step (compiling, loading) or on a second SIGINT it interrupts at once."""

    def __init__(self):
        self.requested, self.armed, self._previous = False, False, None

    def _handle(self, signum, frame):
        if self.armed and not self.requested:
            self.requested = True
            return
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
