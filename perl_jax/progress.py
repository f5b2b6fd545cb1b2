"""Progress lines with a rate and an ETA for long phases other than train steps (held-out
evaluation, checkpoint loading): silent for phases that end within `quiet_s` seconds."""
from __future__ import annotations

import time


class Progress:
  """`update(done)` prints "[name] what done/total unit, rate/s, eta" at most every `every_s`."""

  def __init__(self, name: str, what: str, total: int, unit: str, every_s: float = 10.0,
               quiet_s: float = 5.0):
    self.name, self.what, self.total, self.unit = name, what, total, unit
    self.every_s, self.quiet_s = every_s, quiet_s
    self.start = self.last = time.perf_counter()
    self.printed = False

  def update(self, done: int) -> None:
    now = time.perf_counter()
    finished = done >= self.total
    due = now - self.last >= self.every_s and now - self.start >= self.quiet_s
    if not (due or (finished and self.printed)):
      return
    rate = done / max(now - self.start, 1e-9)
    eta = f", eta {(self.total - done) / rate:.0f}s" if rate and not finished else ""
    print(f"[{self.name}] {self.what} {done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s"
          f"{eta}{f', done in {now - self.start:.0f}s' if finished else ''}", flush=True)
    self.last, self.printed = now, True
