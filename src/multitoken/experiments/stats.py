"""Paired comparisons across seeds and the decision rule every experiment applies to them.

An experiment trains each arm (e.g. n=1 and n=2) once per seed; seed s of every arm sees the same data
order, so the per-seed differences are paired. The comparison reports their mean and a two-sided 95 %
Student-t interval, and `verdict` turns that into one word by a rule fixed before any run:

- undecided: the baseline did not learn the task (its metric is not clearly above chance), so the arms
  cannot differ for the reason the claim names; or the interval is too wide to say;
- refuted: the whole interval lies below the claim's margin (the data exclude an advantage that large);
- reproduced: the whole interval lies above zero and the claim's margin is not excluded.

No dependency beyond numpy: the t quantiles for the few degrees of freedom used here are tabulated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Two-sided 95 % quantiles t_{0.975, df} of Student's t (any statistics table; scipy.stats.t.ppf agrees).
T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 25: 2.060, 30: 2.042,
}  # fmt: skip

REPRODUCED, REFUTED, UNDECIDED = "reproduced", "refuted", "undecided"


def t_quantile(df: int) -> float:
    """t_{0.975, df}; beyond the table the normal quantile 1.96 (off by < 2 % from df 30 on)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 paired values (df >= 1), got df={df}")
    if df in T975:
        return T975[df]
    below = max(k for k in T975 if k < df)
    return T975[below] if df <= 30 else 1.96  # the quantile falls with df: the lower df's is conservative


@dataclass
class Interval:
    """Mean of paired differences and its two-sided 95 % t interval."""

    mean: float
    low: float
    high: float
    n: int
    sd: float


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and 95 % t interval of `values` (sample sd, df = len - 1); at least two values."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {len(x)}")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = t_quantile(len(x) - 1) * sd / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x), sd)


@dataclass
class Rule:
    """The decision rule of one comparison, written down before the runs.

    margin: the smallest advantage of the treatment arm (in the metric's units) that the claim needs;
    baseline_floor: the baseline arm's mean metric must reach this (well above chance) for any verdict
    other than undecided (for a lower-is-better metric: must be at most this). With higher_is_better False
    the differences are negated first, so the margin is always an advantage of the treatment.
    """

    margin: float
    baseline_floor: float
    higher_is_better: bool = True


def verdict(diffs: Sequence[float], baseline_mean: float, rule: Rule, learned: bool | None = None) -> str:
    """reproduced / refuted / undecided for paired differences treatment - baseline (see the module doc).

    `learned` (when given) replaces the baseline-floor test: for comparisons whose baseline is not a trained
    arm (a speedup against 1.0), whether the model learned the task is judged on another metric."""
    sign = 1.0 if rule.higher_is_better else -1.0
    if learned is None:
        learned = sign * baseline_mean >= sign * rule.baseline_floor
    if not learned:
        return UNDECIDED
    ci = t_interval([sign * d for d in diffs])
    if ci.high < rule.margin:
        return REFUTED
    if ci.low > 0:
        return REPRODUCED
    return UNDECIDED


def compare(
    label: str,
    treatment: Sequence[float],
    baseline: Sequence[float],
    rule: Rule,
    metric: str,
    learned: bool | None = None,
) -> dict[str, Any]:
    """One pre-registered comparison: per-seed values of both arms (paired by position), the paired
    interval of treatment - baseline and the verdict."""
    if len(treatment) != len(baseline):
        raise ValueError(f"{label}: {len(treatment)} treatment seeds vs {len(baseline)} baseline seeds")
    diffs = [t - b for t, b in zip(treatment, baseline, strict=True)]
    ci = t_interval(diffs)
    base = float(np.mean(baseline))
    return {
        "comparison": label, "metric": metric, "treatment": list(treatment), "baseline": list(baseline),
        "treatment_mean": float(np.mean(treatment)), "baseline_mean": base,
        "diff": asdict(ci), "rule": asdict(rule), "verdict": verdict(diffs, base, rule, learned),
    }  # fmt: skip


def comparison_rows(comparisons: Sequence[dict[str, Any]], digits: int = 3) -> list[list[str]]:
    """Table rows: comparison, metric, each arm's mean, the difference with its interval, the verdict."""
    rows = []
    for c in comparisons:
        d = c["diff"]
        rows.append([
            c["comparison"], c["metric"], f"{c['treatment_mean']:.{digits}f}", f"{c['baseline_mean']:.{digits}f}",
            f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]",
            _rule_text(c["rule"]), f"**{c['verdict']}**",
        ])  # fmt: skip
    return rows


def _rule_text(rule: dict[str, Any]) -> str:
    better = "higher" if rule["higher_is_better"] else "lower"
    at_least = ">=" if rule["higher_is_better"] else "<="
    return f"{better} is better; margin {rule['margin']:g}; baseline {at_least} {rule['baseline_floor']:g}"


COMPARISON_HEADERS = [
    "comparison", "metric", "treatment (mean)", "baseline (mean)", "difference, 95 % t interval", "rule", "verdict",
]  # fmt: skip

RULE_TEXT = (
    "Decision rule (fixed in the code before any run, `multitoken.experiments.stats.verdict`): per seed, "
    "treatment minus baseline (same seed, same data order); a two-sided 95 % Student-t interval over seeds. "
    "**Undecided** if the baseline's mean metric is below its floor (it did not learn the task, so the arms "
    "cannot differ for the claimed reason); **refuted** if the interval's upper end is below the margin (an "
    "advantage as large as the claim needs is excluded); **reproduced** if its lower end is above 0; "
    "otherwise **undecided**."
)
