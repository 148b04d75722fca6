"""A small progress bar on standard error.

On a terminal it redraws one line (at most ``refresh`` times a second):
bar, step, the latest metrics (loss, accuracy, …), steps/s and ETA.  When
standard error is not a terminal (logs, CI, ``nohup``) it stays quiet except
for one plain line every ``interval`` seconds and a last one at the end.
"""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05``; unknown -> ``?``."""
    if seconds is None or seconds != seconds or seconds == float("inf") or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _format_value(name: str, value) -> str:
    if isinstance(value, float):
        if name in ("acc", "accuracy"):
            return f"{name} {100 * value:.1f}%"
        return f"{name} {value:.4f}"
    return f"{name} {value}"


class Progress:
    """Progress over ``total`` units (steps or lengths), starting at ``initial``.

    Args:
      total: the last unit.
      initial: units already done (a resumed run).
      label: a short prefix (``"train"``, ``"eval"``).
      stream: where to write (standard error by default).
      enabled: False silences it entirely.
      interval: seconds between plain lines when ``stream`` is not a terminal.
      unit: what a unit is called in the rate (``"steps"``).
    """

    def __init__(self, total: int, initial: int = 0, label: str = "", stream=None,
                 enabled: bool = True, interval: float = 30.0, unit: str = "steps",
                 refresh: float = 10.0, width: int = 20):
        self.total, self.done, self.start_units = int(total), int(initial), int(initial)
        self.label, self.unit, self.width = label, unit, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.min_redraw = 1.0 / refresh
        self.started = time.perf_counter()
        self.last_draw = float("-inf")
        self.last_line = self.started
        self.metrics: dict = {}
        self._drawn = False

    # ------------------------------------------------------------------ values
    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        units = self.done - self.start_units
        return units / elapsed if elapsed > 0 and units > 0 else 0.0

    @property
    def eta(self) -> float:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else float("nan")

    def render(self) -> str:
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        parts = [f"{self.label} " if self.label else "",
                 f"[{bar}] {self.done}/{self.total}"]
        for name, value in self.metrics.items():
            parts.append(f"  {_format_value(name, value)}")
        parts.append(f"  {self.rate:.2f} {self.unit}/s  ETA {format_duration(self.eta)}")
        return "".join(parts)

    # ---------------------------------------------------------------- updates
    def update(self, done: int, **metrics) -> None:
        """Record progress ``done`` and the latest ``metrics``; draw if due."""
        self.done = int(done)
        self.metrics.update(metrics)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self.last_draw >= self.min_redraw or self.done >= self.total:
                self.stream.write("\r\033[K" + self.render())
                self.stream.flush()
                self.last_draw, self._drawn = now, True
        elif now - self.last_line >= self.interval:
            self.stream.write(self.render() + "\n")
            self.stream.flush()
            self.last_line = now

    def close(self) -> None:
        """Final state on its own line."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + self.render() + "\n")
        else:
            self.stream.write(self.render() + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of text that does not garble the bar."""
        if not self.enabled:
            return
        if self.tty and self._drawn:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last_draw = float("-inf")
