"""Temporal smoothing of per-frame predictions: the One-Euro filter (Casiez, Roussel and Vogel,
CHI 2012), a low-pass filter whose cutoff rises with the signal's speed, so slow motion is
steadied (per-frame jitter removed) while fast motion keeps little lag. Causal: each output
depends on the frames up to it only, so it also runs live.

  cutoff = min_cutoff + beta * |smoothed derivative|   (Hz; derivative in units per second)
  alpha(cutoff) = 1 / (1 + 1 / (2 pi cutoff dt));  x_hat = alpha x + (1 - alpha) x_hat_prev
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class OneEuroSettings:
  min_cutoff: float = 1.0  # Hz: the cutoff when still (lower: steadier, more lag)
  beta: float = 0.5  # cutoff gain per unit/s of speed (higher: less lag on fast motion)
  d_cutoff: float = 1.0  # Hz: the cutoff of the derivative estimate

  def __post_init__(self):
    if self.min_cutoff <= 0 or self.d_cutoff <= 0 or self.beta < 0:
      raise ValueError(f"One-Euro settings need min_cutoff > 0, d_cutoff > 0, beta >= 0: {self}")


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray:
  tau = 1.0 / (2.0 * np.pi * np.asarray(cutoff, np.float64))
  return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
  """One-Euro filter of an array signal (each value filtered on its own), fed in time order."""

  def __init__(self, settings: OneEuroSettings = OneEuroSettings()):
    self.settings = settings
    self.reset()

  def reset(self) -> None:
    self._value = self._speed = self._time = None

  def __call__(self, value: np.ndarray, time_s: float) -> np.ndarray:
    """The filtered value of `value` (any shape) observed at `time_s` seconds."""
    value = np.asarray(value, np.float64)
    if self._value is None or time_s <= self._time:
      self._value, self._speed, self._time = value, np.zeros_like(value), time_s
      return value.copy()
    s = self.settings
    dt = time_s - self._time
    speed = (value - self._value) / dt
    self._speed = self._speed + _alpha(s.d_cutoff, dt) * (speed - self._speed)
    cutoff = s.min_cutoff + s.beta * np.abs(self._speed)
    self._value = self._value + _alpha(cutoff, dt) * (value - self._value)
    self._time = time_s
    return self._value.copy()


def nearest_rotation(matrix: np.ndarray) -> np.ndarray:
  """The rotation (3, 3) closest to `matrix` (a filtered rotation is no longer orthonormal)."""
  u, _, vt = np.linalg.svd(np.asarray(matrix, np.float64).reshape(3, 3))
  if np.linalg.det(u @ vt) < 0:
    u[:, -1] = -u[:, -1]
  return u @ vt


def jitter(series: np.ndarray) -> float:
  """Mean frame-to-frame change of a (T, ...) series: what smoothing should lower."""
  series = np.asarray(series, np.float64).reshape(len(series), -1)
  return float(np.mean(np.linalg.norm(np.diff(series, axis=0), axis=1)))
