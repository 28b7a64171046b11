"""A small progress bar for long work (downloads, featurization, runs), written to stderr.

Shown only when stderr is a terminal and ``DISTBERT_NO_PROGRESS`` is unset; otherwise a start and an
end line are logged so batch logs (``sbatch``, CI) still show what happened and how long it took.
"""

from __future__ import annotations

import logging
import sys
import time

from distbert import envs

log = logging.getLogger(__name__)


class Progress:
    """``with Progress("featurizing", total=n, unit="q") as p: p.update(k)``."""

    def __init__(self, label: str, total: float | None, unit: str = "", scale: float = 1.0,
                 scaled_unit: str | None = None) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.scale = scale
        self.scaled_unit = scaled_unit or unit
        self.done = 0.0
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._tty = sys.stderr.isatty() and not envs.no_progress()

    def __enter__(self) -> Progress:
        if not self._tty:
            log.info("%s ...", self.label)
        return self

    def update(self, n: float) -> None:
        self.done += n
        if self._tty:
            now = time.monotonic()
            if now - self._last_draw >= 0.1:
                self._last_draw = now
                self._draw()

    def _fmt(self, value: float) -> str:
        return f"{value / self.scale:,.1f}" if self.scale != 1.0 else f"{value:,.0f}"

    def _draw(self, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed / self.scale
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = (f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% "
                    f"{self._fmt(self.done)}/{self._fmt(self.total)} {self.scaled_unit} "
                    f"{rate:,.1f} {self.scaled_unit}/s")
        else:
            text = f"\r{self.label} {self._fmt(self.done)} {self.scaled_unit} {rate:,.1f} {self.scaled_unit}/s"
        sys.stderr.write(text + ("\n" if final else ""))
        sys.stderr.flush()

    def __exit__(self, exc_type, exc, tb) -> None:
        elapsed = time.monotonic() - self._start
        if self._tty:
            self._draw(final=True)
        if exc_type is None:
            log.info("%s: done, %s %s in %.2f s", self.label, self._fmt(self.done), self.scaled_unit, elapsed)
