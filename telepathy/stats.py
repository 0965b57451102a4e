"""The statistics `launch report` puts beside each number (scipy for the distributions; torch-free).

- Wilson score interval of one run's accuracy (k correct of n): the binomial interval that stays inside
  [0, 1] and keeps its coverage at small n and near 0 or 1, where the normal approximation does not.
- The interval over seeds: mean +- t(0.975, n-1) * s / sqrt(n), the sample std s over the seeds' accuracies
  (the seeds are the replicates: this is what "93.7 +- 0.3 over seeds" promises about another seed).
- Paired exact McNemar: two methods on the same examples differ only where one is right and the other wrong;
  under "no difference" those discordant examples split 50/50, so the two-sided p-value is the exact binomial
  test of b successes in b + c trials (scipy.stats.binomtest).
- Holm's step-down correction of a family of p-values (controls the family-wise error rate at alpha, uniformly
  more powerful than Bonferroni).
- Seeds that disagree: the spread (max - min) of a cell's seeds above a threshold, and two modes: at least
  three seeds whose largest gap between neighbours (sorted) exceeds a threshold (TREC at K=8 in the original:
  35.4, 41.4, 61.2, 83.8, 85.8).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
SPREAD_PP = 5.0  # percentage points between a cell's best and worst seed that flag it
GAP_PP = 15.0  # percentage points between neighbouring seeds (sorted) that flag two modes


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials, as fractions."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def seed_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The t interval of the mean over seeds (None for fewer than two values)."""
    if len(values) < 2:
        return None
    from scipy.stats import t  # noqa: PLC0415  (scipy only when a report is computed)

    mean, s = statistics.fmean(values), statistics.stdev(values)
    half = t.ppf(0.5 + level / 2, len(values) - 1) * s / math.sqrt(len(values))
    return (mean - half, mean + half)


def mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b examples only the first method got right, c only the second."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest  # noqa: PLC0415  (scipy only when a report is computed)

    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input's order: the i-th smallest times (m - i), made monotone, capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def disagreement(values: Sequence[float], spread_pp: float = SPREAD_PP, gap_pp: float = GAP_PP) -> list[str]:
    """Why a cell's seeds (accuracies in %) should not be summarised by mean +- std alone: [] when they agree."""
    if len(values) < 2:
        return []
    flags = []
    ordered = sorted(values)
    spread = ordered[-1] - ordered[0]
    if spread > spread_pp:
        flags.append(f"seeds disagree: {spread:.1f} pp between best and worst")
    gaps = [b - a for a, b in zip(ordered, ordered[1:])]
    if len(values) >= 3 and max(gaps) > gap_pp:
        cut = gaps.index(max(gaps)) + 1
        low, high = ordered[:cut], ordered[cut:]
        lo, hi = statistics.fmean(low), statistics.fmean(high)
        flags.append(f"two modes: {len(low)} seed(s) near {lo:.1f}, {len(high)} near {hi:.1f}")
    return flags
