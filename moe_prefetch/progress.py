"""Progress of a long loop: a tqdm bar on a terminal; elsewhere (a log file, `dvc repro` under CI) one plain line
every `interval` seconds and one at the end, with the rate and the time left."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Counts `total` units of work: `update(n)` after each piece, `close()` at the end (or use it as a context).
    enabled=False shows nothing (the non-main processes of a distributed run)."""

    def __init__(self, total: int, desc: str, unit: str = "it", interval: float = 30.0, stream=None, enabled: bool = True):
        self.total, self.desc, self.unit, self.interval, self.enabled = total, desc, unit, interval, enabled
        self.stream = stream or sys.stdout  # stdout: stderr carries only the one-line error of a failed stage
        self.done = 0
        self.started = self.last_line = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream) if enabled and self.stream.isatty() else None

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix)
        elif time.perf_counter() - self.last_line >= self.interval:
            self._line(postfix)

    def _line(self, postfix: dict) -> None:
        self.last_line = now = time.perf_counter()
        rate = self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        extra = "".join(f", {key} {value}" for key, value in postfix.items())
        print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, {left:.0f}s left{extra})",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done:
            self._line({})

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
