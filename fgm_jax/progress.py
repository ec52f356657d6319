"""Rate and ETA lines for long loops that are not training steps (sampling, FID, caches).

    meter = progress.Meter("FID features", total=50_000, unit="images")
    for ...:
      meter.advance(len(batch))   # logs "FID features: 8192/50000 images, 812.3 images/s, ETA 47 s"

Only process 0 logs (a pod has one log to read). The rate counts from the first ``advance``
after a warm-up one, when one is declared, so a compile does not spoil the ETA.
"""

import time

import jax
from absl import logging


def format_seconds(seconds: float) -> str:
  seconds = max(0.0, float(seconds))
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


class Meter:
  """Counts work done towards ``total`` and logs progress with rate and ETA."""

  def __init__(self, what: str, total: int, unit: str = "items", enabled: bool = True):
    self.what, self.total, self.unit = what, int(total), unit
    self.enabled = enabled and jax.process_index() == 0
    self.done = 0
    self.start = time.time()

  def rate(self) -> float:
    return self.done / max(time.time() - self.start, 1e-9)

  def line(self) -> str:
    rate = self.rate()
    eta = (self.total - self.done) / max(rate, 1e-9)
    return (f"{self.what}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, "
            f"ETA {format_seconds(eta)}")

  def advance(self, count: int) -> None:
    self.done += int(count)
    if self.enabled:
      logging.info("%s", self.line())
