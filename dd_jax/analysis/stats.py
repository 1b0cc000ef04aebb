"""Statistics the report states: means and SDs across participants, one-way ANOVA with eta²,
least-squares lines."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from scipy import stats as scipy_stats


@dataclasses.dataclass(frozen=True)
class AcrossParticipants:
  """A metric computed per participant, then summarised: mean and sample SD (ddof 1; NaN with
  one participant) over the participants that have any selected frame."""
  per_participant: dict[int, float]
  frames: int

  @property
  def values(self) -> np.ndarray:
    return np.array(list(self.per_participant.values()), np.float64)

  @property
  def mean(self) -> float:
    return float(np.mean(self.values)) if self.per_participant else float("nan")

  @property
  def sd(self) -> float:
    return float(np.std(self.values, ddof=1)) if len(self.per_participant) > 1 else float("nan")


def across_participants(participant: np.ndarray, select: np.ndarray | None,
                        metric: Callable[[np.ndarray], float]) -> AcrossParticipants:
  """metric(rows) for each participant's selected rows (positions into the per-frame arrays)."""
  participant = np.asarray(participant)
  select = np.ones(len(participant), bool) if select is None else np.asarray(select, bool)
  per = {}
  for p in np.unique(participant[select]):
    rows = np.flatnonzero(select & (participant == p))
    per[int(p)] = float(metric(rows))
  return AcrossParticipants(per, int(select.sum()))


def mean_of(values: np.ndarray) -> Callable[[np.ndarray], float]:
  """A metric: the mean of a per-frame (N,) or per-frame-and-item (N, K) array over rows."""
  values = np.asarray(values, np.float64)
  return lambda rows: float(np.nanmean(values[rows]))


def rmse_of(errors: np.ndarray) -> Callable[[np.ndarray], float]:
  errors = np.asarray(errors, np.float64)
  return lambda rows: float(np.sqrt(np.mean(errors[rows] ** 2)))


@dataclasses.dataclass(frozen=True)
class Anova:
  f: float
  df_between: int
  df_within: int
  p: float
  eta_squared: float  # SS_between / SS_total


def one_way_anova(values: np.ndarray, groups: np.ndarray) -> Anova:
  """One-way ANOVA of `values` (N,) by `groups` (N,); NaN values are dropped."""
  values = np.asarray(values, np.float64)
  groups = np.asarray(groups)
  keep = np.isfinite(values)
  values, groups = values[keep], groups[keep]
  names = np.unique(groups)
  grand = values.mean()
  ss_total = float(np.sum((values - grand) ** 2))
  ss_between = float(sum(np.sum(groups == g) * (values[groups == g].mean() - grand) ** 2
                         for g in names))
  df_between, df_within = len(names) - 1, len(values) - len(names)
  ss_within = ss_total - ss_between
  if df_between < 1 or df_within < 1 or ss_within <= 0:
    f = p = float("nan")
  else:
    f = (ss_between / df_between) / (ss_within / df_within)
    p = float(scipy_stats.f.sf(f, df_between, df_within))
  eta = ss_between / ss_total if ss_total > 0 else float("nan")
  return Anova(float(f), df_between, df_within, p, eta)


@dataclasses.dataclass(frozen=True)
class Line:
  slope: float
  intercept: float
  r_squared: float
  n: int


def fit_line(x: np.ndarray, y: np.ndarray) -> Line:
  """Least-squares y = intercept + slope * x over the finite pairs."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  keep = np.isfinite(x) & np.isfinite(y)
  x, y = x[keep], y[keep]
  if len(x) < 2 or np.ptp(x) == 0:
    return Line(float("nan"), float("nan"), float("nan"), len(x))
  slope, intercept = np.polyfit(x, y, 1)
  residual = y - (intercept + slope * x)
  total = np.sum((y - y.mean()) ** 2)
  r2 = 1.0 - np.sum(residual ** 2) / total if total > 0 else float("nan")
  return Line(float(slope), float(intercept), float(r2), len(x))
