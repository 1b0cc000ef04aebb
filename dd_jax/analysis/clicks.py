"""Per-click force results: clicks found in each trial's FSR trace, one label per click by
majority vote over its frames, as the paper reports press classification.

A click is a peak of the trial's FSR trace above 20% of the trial's maximum reading: each
maximal run of consecutive frames (in time order) whose reading exceeds that level is one click.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLICK_FRACTION = 0.2  # of the trial's maximum FSR reading


@dataclasses.dataclass(frozen=True)
class Click:
  """One click: the positions (into the per-frame arrays) of its frames, in time order."""
  trial_id: int
  frames: np.ndarray
  peak: int  # position of the frame with the highest reading


def find_clicks(fsr: np.ndarray, trial_id: np.ndarray, time: np.ndarray,
                fraction: float = CLICK_FRACTION) -> list[Click]:
  """Clicks of every trial. fsr, trial_id, time: (N,) per frame (any order; NaN readings never
  belong to a click). Frames are put in time order within each trial."""
  fsr = np.asarray(fsr, np.float64)
  trial_id = np.asarray(trial_id)
  time = np.asarray(time, np.float64)
  clicks = []
  for trial in np.unique(trial_id):
    rows = np.flatnonzero(trial_id == trial)
    rows = rows[np.argsort(time[rows], kind="stable")]
    reading = fsr[rows]
    top = np.nanmax(reading) if np.any(np.isfinite(reading)) else np.nan
    if not top > 0:
      continue
    above = np.nan_to_num(reading, nan=-np.inf) > fraction * top
    # Runs of True: starts where the mask rises, ends where it falls.
    edges = np.diff(np.concatenate([[0], above.astype(np.int8), [0]]))
    for start, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
      members = rows[start:stop]
      clicks.append(Click(int(trial), members, int(members[np.argmax(fsr[members])])))
  return clicks


def vote(labels: np.ndarray, click: Click) -> int:
  """The most frequent label over the click's frames; a tie goes to the label of the peak frame
  if it is among the tied ones, else to the smallest tied label."""
  labels = np.asarray(labels).reshape(len(labels), -1)[:, 0]
  values, counts = np.unique(labels[click.frames], return_counts=True)
  tied = values[counts == counts.max()]
  peak = labels[click.peak]
  return int(peak if peak in tied else tied.min())


def click_labels(pred: np.ndarray, gt: np.ndarray, clicks: list[Click]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(C,) predicted and (C,) true click labels, each a vote over the click's frames."""
  return (np.array([vote(pred, c) for c in clicks], np.int64),
          np.array([vote(gt, c) for c in clicks], np.int64))


def confusion(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
  """(K, K) counts [true, predicted]."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(true, np.int64), np.asarray(pred, np.int64)), 1)
  return matrix
