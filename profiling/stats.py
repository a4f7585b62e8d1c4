"""Statistics for timings that are compared: medians with 95% intervals, paired ratios, claims.

Everything here is pure (numpy only) and deterministic: the same samples give the same interval,
so a report regenerated from the same files says the same thing.

Intervals. A timing's median comes with the distribution-free order-statistic interval for the
median (Conover, *Practical Nonparametric Statistics*, 3rd ed., section 3.2): of n sorted
samples x_(1) <= ... <= x_(n), [x_(k), x_(n+1-k)] covers the true median with probability
1 - 2 P(B <= k-1), B ~ Binomial(n, 1/2); `median_interval` takes the largest k that keeps that
at or above the level asked for (95%). It assumes nothing about the distribution's shape (step
times are skewed: load only ever adds time), only that samples are exchangeable; with fewer than
6 samples no interval reaches 95% and [min, max] is returned with its true (lower) coverage,
which is reported. Steps taken close together share the machine's state, so the studies
interleave strategies step by step and rotate their order between repeats
(`dist_ortho.studies.interleaved`): a burst of load then hits every strategy alike instead of one.

Comparisons. Two strategies measured in the same interleaved rounds are compared by their
paired ratio: per round, A's step time / B's (the two steps were taken one after the other, so
the machine's drift cancels); the ratio's median and order-statistic interval say how much
faster A is. This interval is tighter than comparing two separate intervals, and honest for the
same reason (pairs, not steps, are the exchangeable units).

Unpaired timings (points that ran one after another, `schedule.mode: separate`) have no rounds
to pair: `compare_unpaired` bounds the ratio by interval arithmetic, [low_A / high_B,
high_A / low_B], and applies the same rule to it, which claims only when the two intervals are
apart by the margin.

Claims ("A faster than B"). `compare` claims A faster than B only when the paired ratio's whole
interval lies below 1 - margin (default 5%), the interval at the level asked for: 95% for one
comparison, and for m comparisons made together (every pair of a group of strategies)
`family_level(m)` = 1 - 5%/m, so that all of them together keep 95% (Bonferroni). A claim needs
a difference the noise of this run cannot explain, and that difference must be at least the
margin. Otherwise the pair is "not
distinguishable at this noise" (a tie). The margin is what makes a claim survive a rerun: a
claim's interval ends below 1 - margin, so a rerun with a similar spread (a half-width below the
margin) puts its whole interval below 1 as well; `claim_holds` is that check, and the report's
rerun test (tests/studies/test_interleaved_study_statistics.py) applies it to every claim of two reruns of the same study.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["LEVEL", "MARGIN", "Interval", "NAN_INTERVAL", "binomial_coverage", "family_level",
           "median_interval",
           "paired_ratios", "ratio_interval", "interval_ratio", "Comparison", "compare",
           "compare_unpaired", "claim_holds", "claims", "ordering"]

LEVEL = 0.95  # the coverage every interval aims for
MARGIN = 0.05  # a claim's interval must end below 1 - MARGIN


def family_level(comparisons: int, level: float = LEVEL) -> float:
    """The per-comparison level that keeps `comparisons` simultaneous comparisons at `level`
    together (Bonferroni): 1 - (1 - level) / comparisons; `level` itself for one or none."""
    return 1.0 - (1.0 - level) / max(1, comparisons)


def binomial_coverage(n: int, k: int) -> float:
    """Coverage of [x_(k), x_(n+1-k)] for the median of n exchangeable samples:
    1 - 2 P(Binomial(n, 1/2) <= k - 1)."""
    if n < 1 or not 1 <= k <= (n + 1) // 2:
        raise ValueError(f"need n >= 1 and 1 <= k <= (n+1)/2, got n={n}, k={k}")
    tail = sum(math.comb(n, j) for j in range(k)) / 2.0 ** n
    return 1.0 - 2.0 * tail


@dataclass(frozen=True)
class Interval:
    """A median and its interval: `low <= median <= high`, `coverage` the probability that the
    interval holds the true median (>= the level asked for when n allows), n the sample count."""

    median: float
    low: float
    high: float
    n: int
    coverage: float

    @property
    def half_width(self) -> float:
        """Half the interval's width relative to the median (0.05: +-5%)."""
        return (self.high - self.low) / 2 / self.median if self.median else math.nan

    def scaled(self, factor: float) -> "Interval":
        """The same interval for the values times `factor` (> 0)."""
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor!r}")
        return Interval(self.median * factor, self.low * factor, self.high * factor, self.n,
                        self.coverage)

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high

    def format(self, spec: str = ".3g", scale: float = 1.0) -> str:
        """"m [lo, hi]" with each number scaled and formatted by `spec`."""
        if not math.isfinite(self.median):
            return "–"
        m, lo, hi = (format(v * scale, spec) for v in (self.median, self.low, self.high))
        return f"{m} [{lo}, {hi}]"

    def to_dict(self) -> dict:
        return asdict(self)


NAN_INTERVAL = Interval(math.nan, math.nan, math.nan, 0, math.nan)


def _finite(values: Iterable[float]) -> np.ndarray:
    x = np.asarray([float(v) for v in values], dtype=float)
    return x[np.isfinite(x)]


def median_interval(values: Iterable[float], level: float = LEVEL) -> Interval:
    """The median of the finite values and its order-statistic interval (module docstring)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    x = np.sort(_finite(values))
    n = len(x)
    if n == 0:
        return NAN_INTERVAL
    k = 1
    while k + 1 <= (n + 1) // 2 and binomial_coverage(n, k + 1) >= level:
        k += 1
    return Interval(float(np.median(x)), float(x[k - 1]), float(x[n - k]), n,
                    binomial_coverage(n, k))


def paired_ratios(a: Mapping, b: Mapping) -> list[float]:
    """a[key] / b[key] for every key both have (a round: repeat and index), in key order."""
    keys = sorted(set(a) & set(b))
    return [a[k] / b[k] for k in keys if b[k] > 0 and math.isfinite(a[k] / b[k])]


def ratio_interval(a: Mapping, b: Mapping, level: float = LEVEL) -> Interval:
    """Median of the paired ratios a/b and its interval."""
    return median_interval(paired_ratios(a, b), level)


@dataclass(frozen=True)
class Comparison:
    """A against B: the paired ratio A/B (below 1: A is faster) and the verdict, one of
    "faster" (A faster than B), "slower" (B faster than A) and "tie"."""

    a: str
    b: str
    ratio: Interval
    verdict: str
    margin: float

    @property
    def claim(self) -> tuple[str, str] | None:
        """(faster, slower) when a claim is made, else None."""
        if self.verdict == "faster":
            return (self.a, self.b)
        if self.verdict == "slower":
            return (self.b, self.a)
        return None

    def sentence(self) -> str:
        r = self.ratio
        if self.claim is None:
            return (f"{self.a} vs {self.b}: not distinguishable at this noise "
                    f"(ratio {r.format('.2f')})")
        fast, slow = self.claim
        inv = r if fast == self.a else Interval(1 / r.median, 1 / r.high, 1 / r.low, r.n,
                                                r.coverage)
        return f"{fast} faster than {slow}: step time ratio {inv.format('.2f')}"


def compare(a: str, b: str, times_a: Mapping, times_b: Mapping, margin: float = MARGIN,
            level: float = LEVEL) -> Comparison:
    """The paired comparison of A and B (module docstring): "faster" when the ratio's interval
    ends below 1 - margin, "slower" when it starts above 1 / (1 - margin), else "tie"."""
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    r = ratio_interval(times_a, times_b, level)
    if r.n == 0 or not math.isfinite(r.high):
        verdict = "tie"
    elif r.coverage < level:  # too few rounds for a 95% interval: claim nothing
        verdict = "tie"
    elif r.high < 1 - margin:
        verdict = "faster"
    elif r.low > 1 / (1 - margin):
        verdict = "slower"
    else:
        verdict = "tie"
    return Comparison(a, b, r, verdict, margin)


def interval_ratio(a: Interval, b: Interval) -> Interval:
    """A / B for two separately measured medians: the ratio of the medians, bounded by interval
    arithmetic [low_A / high_B, high_A / low_B] (coverage at least that of both together)."""
    if a.n == 0 or b.n == 0 or not b.low > 0:
        return NAN_INTERVAL
    return Interval(a.median / b.median, a.low / b.high, a.high / b.low, min(a.n, b.n),
                    max(0.0, a.coverage + b.coverage - 1))


def compare_unpaired(a: str, b: str, interval_a: Interval, interval_b: Interval,
                     margin: float = MARGIN, level: float = LEVEL) -> Comparison:
    """The comparison of two separately measured medians (module docstring): the same rule as
    `compare`, on `interval_ratio`; a claim needs both intervals at the level asked for."""
    r = interval_ratio(interval_a, interval_b)
    enough = min(interval_a.coverage, interval_b.coverage) >= level if r.n else False
    verdict = "tie"
    if enough and r.high < 1 - margin:
        verdict = "faster"
    elif enough and r.low > 1 / (1 - margin):
        verdict = "slower"
    return Comparison(a, b, r, verdict, margin)


def claims(times: Mapping[str, Mapping], margin: float = MARGIN,
           level: float = LEVEL) -> list[Comparison]:
    """Every pair of `times` (label -> {round: seconds}) compared once, in label order."""
    labels = list(times)
    return [compare(a, b, times[a], times[b], margin, level)
            for i, a in enumerate(labels) for b in labels[i + 1:]]


def claim_holds(claim: tuple[str, str], times: Mapping[str, Mapping],
                level: float = LEVEL) -> bool:
    """Whether a claim (faster, slower) of one run holds in another run's `times`: there the
    paired ratio faster/slower has its whole interval below 1 (module docstring)."""
    fast, slow = claim
    if fast not in times or slow not in times:
        return False
    r = ratio_interval(times[fast], times[slow], level)
    return r.n > 0 and r.coverage >= level and r.high < 1


def ordering(medians: Mapping[str, float], comparisons: Sequence[Comparison]) -> str:
    """Labels from fastest to slowest median, joined by "<" where the neighbours are claimed
    apart and "≈" where they are not distinguishable, e.g. "a ≈ b < c"."""
    labels = sorted(medians, key=lambda k: medians[k])
    apart = {c.claim for c in comparisons if c.claim is not None}
    out = labels[:1]
    for prev, cur in zip(labels, labels[1:]):
        out += ["<" if (prev, cur) in apart else "≈", cur]
    return " ".join(out)
