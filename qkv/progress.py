"""Progress of long loops: a tqdm bar in a terminal, plain periodic log lines everywhere else.

A bar redraws itself with ``\\r``; written to a file or a pipe (nohup, CI, ``| tee run.log``) its
redraws pile up into lines of thousands of characters with the log lines glued on. So
:class:`Progress` looks at its stream once: on a terminal it is a tqdm bar, and :class:`LogHandler`
(installed by the CLI) writes log records through ``tqdm.write`` so they land above the bar;
elsewhere it logs one plain line (logger ``qkv.progress``) every ``every_n`` units and at least
every ``every_s`` seconds, and one at the end (by time alone: only if it said something before, so
a command done in a few seconds stays silent)::

    train 100/200 steps (50%) | loss 2.587 | 12.4k tokens/s | 16.1 steps/s | 0:06 elapsed, ETA 0:06

The rate after the count is units per second; fields (``set``) carry the rest, e.g. the training
rate in the task's own unit. ETA = (total - done) / rate, from the units done since the start.
Library code never prints: the plain lines are log records, and a disabled Progress does nothing.
A loop deep in the library reports through :func:`tick` (and :func:`expect` for its total): they move
the Progress the caller made :func:`active`, and do nothing when there is none.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterator
from typing import IO

from tqdm import tqdm

log = logging.getLogger("qkv.progress")


def is_terminal(stream: IO | None) -> bool:
    """True when ``stream`` is an interactive terminal (a bar may redraw there)."""
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def human_rate(value: float) -> str:
    """12345.6 -> "12.3k", 8.123 -> "8.12", 0.05 -> "0.05" (three significant figures)."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def human_time(seconds: float) -> str:
    """75 -> "1:15", 3725 -> "1:02:05"."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def plural(unit: str) -> str:
    return unit if unit.endswith("s") else unit + "s"


class Progress:
    """Counts units of work (steps, sentences, images) towards ``total`` (None: unknown, no ETA).

    ``enabled=False`` (``--quiet``, a rank other than 0) shows nothing. ``bar``: None decides from
    ``stream`` (a terminal: a tqdm bar), True/False forces it. Use as a context manager or call
    ``close``.
    """

    def __init__(self, *, desc: str, unit: str, total: int | None = None, initial: int = 0, enabled: bool = True,
                 every_n: int | None = None, every_s: float | None = 10.0, stream: IO | None = None,
                 bar: bool | None = None):
        if every_n is not None and every_n < 1:
            raise ValueError(f"every_n must be >= 1 or None, got {every_n}")
        self.desc, self.unit, self.total, self.enabled = desc, unit, total, enabled
        self.every_n, self.every_s = every_n, every_s
        self.done = self._start_done = self._last_done = initial
        self._start = self._last_time = time.perf_counter()
        self._fields: dict[str, str] = {}
        self._emitted = False
        stream = sys.stderr if stream is None else stream
        use_bar = enabled and (is_terminal(stream) if bar is None else bar)
        self._bar = (tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream)
                     if use_bar else None)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set(self, **fields: str) -> None:
        """Named figures shown after the count: ``loss="2.587"`` shows "loss 2.587"; a name with a "/" is a
        unit and follows its value (``**{"tokens/s": "12.4k"}`` shows "12.4k tokens/s")."""
        self._fields.update(fields)
        if self._bar is not None:
            self._bar.set_postfix_str(", ".join(self._shown()), refresh=False)

    def _shown(self) -> list[str]:
        return [f"{v} {k}" if "/" in k else f"{k} {v}" for k, v in self._fields.items()]

    def expect(self, total: int) -> None:
        """The total becomes known (or changes): the ETA counts towards it."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        """``n`` more units done; a plain line when a multiple of ``every_n`` is crossed or ``every_s`` passed."""
        if not self.enabled:
            return
        before, self.done = self.done, self.done + n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        crossed = self.every_n is not None and self.done // self.every_n > before // self.every_n
        late = self.every_s is not None and now - self._last_time >= self.every_s
        finished = self.total is not None and self.done >= self.total and self._periodic()
        if crossed or late or finished:
            self._emit(now)

    def close(self) -> None:
        """The bar ends (a terminal), or a last line if the count moved since the last one."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.done != self._last_done and self._periodic():
            self._emit(time.perf_counter())

    def _periodic(self) -> bool:
        """Whether a last line is due: always with ``every_n``; by time alone only after a first line (a
        command done in a few seconds says nothing)."""
        return self.every_n is not None or self._emitted

    def line(self, now: float | None = None) -> str:
        """The plain line for where the count stands (what the non-terminal mode logs)."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self._start
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{self.desc} {count} {plural(self.unit)}"]
        if self.total:
            parts[0] += f" ({100 * self.done // self.total}%)"
        parts += self._shown()
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        timing = f"{human_time(elapsed)} elapsed"
        if rate > 0:
            parts.append(f"{human_rate(rate)} {plural(self.unit)}/s")
            if self.total is not None and self.done < self.total:
                timing += f", ETA {human_time((self.total - self.done) / rate)}"
        return " | ".join([*parts, timing])

    def _emit(self, now: float) -> None:
        log.info("%s", self.line(now))
        self._last_done, self._last_time, self._emitted = self.done, now, True


class LogHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write``: a record lands above an active bar, never glued on."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


# -- the progress of a loop that does not know who is watching ------------------------------------
_ACTIVE: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("qkv_progress", default=None)


@contextlib.contextmanager
def active(progress: Progress) -> Iterator[Progress]:
    """Make ``progress`` the one that :func:`tick` and :func:`expect` move while the block runs; closed after."""
    token = _ACTIVE.set(progress)
    try:
        with progress:
            yield progress
    finally:
        _ACTIVE.reset(token)


def expect(total: int) -> None:
    """A library loop says how many units it will do (for the ETA); nothing when no progress is active."""
    progress = _ACTIVE.get()
    if progress is not None:
        progress.expect(total)


def tick(n: int = 1) -> None:
    """A library loop did ``n`` more units; nothing when no progress is active (one dict lookup)."""
    progress = _ACTIVE.get()
    if progress is not None:
        progress.update(n)
