"""Clean interrupts of a training run: SIGINT (Ctrl-C) and SIGTERM.

While :class:`DeferredInterrupts` is active (the training loop), the first
SIGINT or SIGTERM only records the request: the loop finishes the step it
is in, writes a checkpoint and raises :class:`TrainingInterrupted`, which
the command line reports as::

    interrupted at step N; checkpoint written; continue with: treesched train --out DIR --resume

and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
A second signal stops at once: it raises :class:`TrainingInterrupted`
(``immediate=True``) wherever the program is.  That is safe because every
file is written atomically (a write cut short leaves the previous file and
a temporary file the next start removes) and the log lines past the last
checkpoint are dropped on resume.

Signal handlers can only be installed from the main thread; elsewhere the
context does nothing and signals keep their usual effect.
"""

from __future__ import annotations

import signal
import threading

EXIT_STATUS_BASE = 128
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT / SIGTERM.

    Attributes:
      signal_number: the signal (``signal.SIGINT``, ``signal.SIGTERM``).
      step: the last completed step (None when not known: stopped at once).
      checkpoint_step: the step of the checkpoint on disk (None: none yet).
      immediate: True when a second signal stopped the run mid-step.
      out: the run folder.
    """

    def __init__(self, signal_number: int, step=None, checkpoint_step=None,
                 immediate: bool = False, out=None):
        super().__init__(signal_number)
        self.signal_number = int(signal_number)
        self.step, self.checkpoint_step = step, checkpoint_step
        self.immediate, self.out = immediate, out

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS_BASE + self.signal_number

    def message(self) -> str:
        resume = f"treesched train --out {self.out} --resume"
        if not self.immediate:
            return (f"interrupted at step {self.step}; checkpoint written; continue with: "
                    f"{resume}")
        kept = (f"the checkpoint of step {self.checkpoint_step} is kept"
                if self.checkpoint_step is not None else "no checkpoint was written yet")
        return f"stopped at once by a second signal; {kept}; continue with: {resume}"


class DeferredInterrupts:
    """Record the first SIGINT / SIGTERM instead of acting on it (a context manager).

    ``requested`` is the signal number of the first request (None until
    one arrives).  A second signal raises :class:`TrainingInterrupted`
    with ``immediate=True`` at once.  The previous handlers are restored on
    exit.
    """

    def __init__(self, notice=None):
        self.requested: int | None = None
        self._notice = notice
        self._previous: dict = {}

    def _handle(self, signal_number, frame):
        if self.requested is not None:
            raise TrainingInterrupted(signal_number, immediate=True)
        self.requested = signal_number
        if self._notice is not None:
            self._notice(signal_number)

    def __enter__(self) -> "DeferredInterrupts":
        if threading.current_thread() is threading.main_thread():
            for number in HANDLED_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


__all__ = ["DeferredInterrupts", "TrainingInterrupted", "HANDLED_SIGNALS"]
