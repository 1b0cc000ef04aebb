"""The report's figures as PNG files: PCK curves, MPJAE against finger visibility, confusion
matrices. Plots use matplotlib's object API (no pyplot state, no display needed)."""

from __future__ import annotations

import cv2
import numpy as np
from matplotlib.figure import Figure

from dd_jax import metrics
from dd_jax.analysis import stats
from dd_jax.viz import pictures

MODEL_COLOR, PRIOR_COLOR = "#2a9d4b", "#d9483b"  # as the validation pictures: green, red
MAX_SCATTER_POINTS = 4000


def pck_figure(curves: dict[str, np.ndarray], path: str) -> str:
  """PCK (share of keypoints within the threshold) over 0-50 mm for model and prior."""
  fig = Figure(figsize=(5.5, 4), dpi=120)
  ax = fig.add_subplot()
  for name, curve in curves.items():
    ax.plot(metrics.AUC_THRESHOLDS_MM, curve, color=MODEL_COLOR if "DeltaDorsal" in name
            else PRIOR_COLOR, linestyle="--" if "PA-" in name else "-", label=name)
  ax.set(xlabel="threshold (mm)", ylabel="PCK", xlim=(0, metrics.AUC_MAX_MM), ylim=(0, 1.01),
         title="PCK, mean over participants")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path)
  return path


def visibility_figure(visible: np.ndarray, model_error: np.ndarray, prior_error: np.ndarray,
                      path: str, seed: int = 0) -> str:
  """Finger MPJAE against the finger's visible share (one point per frame and finger, at most
  MAX_SCATTER_POINTS drawn), with least-squares lines over all pairs."""
  visible = 100.0 * np.asarray(visible, np.float64)
  fig = Figure(figsize=(5.5, 4), dpi=120)
  ax = fig.add_subplot()
  shown = np.flatnonzero(np.isfinite(visible))
  if len(shown) > MAX_SCATTER_POINTS:
    shown = np.random.default_rng(seed).choice(shown, MAX_SCATTER_POINTS, replace=False)
  xs = np.linspace(0, 100, 2)
  for name, errors, color in (("prior", prior_error, PRIOR_COLOR),
                              ("DeltaDorsal", model_error, MODEL_COLOR)):
    ax.scatter(visible[shown], np.asarray(errors)[shown], s=6, alpha=0.35, color=color,
               linewidths=0)
    line = stats.fit_line(visible, errors)
    if np.isfinite(line.slope):
      ax.plot(xs, line.intercept + line.slope * xs, color=color,
              label=f"{name}: {10 * line.slope:+.2f}°/10%, R² {line.r_squared:.2f}")
  ax.set(xlabel="finger visible (%)", ylabel="finger MPJAE (°)", xlim=(0, 100),
         title="MPJAE against finger visibility")
  ax.grid(alpha=0.3)
  ax.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(path)
  return path


def confusion_figure(matrix: np.ndarray, path: str) -> str:
  """The training pictures' confusion heat map (rows true, columns predicted) as a PNG."""
  cv2.imwrite(path, cv2.cvtColor(pictures.confusion_matrix(matrix), cv2.COLOR_RGB2BGR))
  return path
