"""The report's "HSDP replicas" section: each strategy's spread and repeat points side by side.

A study that runs a strategy twice on an HSDP mesh (`train.replicate` > 1), as the labels
`<name>-spread` and `<name>-repeat` (launch/configs/hsdp_study.yaml: one interleaved job, so both
modes are stepped round by round in one process group), gets one row per strategy: both modes'
median step times with their 95% intervals, the paired ratio spread/repeat (the median of the
per-round ratios, its interval Bonferroni-corrected over the table's rows, as the Ranking section
does) and its verdict at the study's claim margin, the busiest rank's planned NS FLOPs, and the
bytes the busiest rank sends on the replicate axis (run.json's `planned_bytes_by_axis`; the
counted bytes equal the plan per axis, tests/meshes/test_meshes_match_the_reference.py).
"""

from __future__ import annotations

from dist_ortho.profiling.stats import Interval, compare
from dist_ortho.reporting.comparison import family_level

__all__ = ["MODES", "hsdp_pairs", "hsdp_lines"]

MODES = ("spread", "repeat")


def hsdp_pairs(results) -> list[tuple[str, int, str, object, object]]:
    """(facet, world size, strategy, spread row, repeat row) for every strategy that has both."""
    out = []
    points = results.summary
    for (facet, p), sel in points.groupby(["facet", "world_size"], sort=False):
        rows = {r.label: r for r in sel.itertuples()}
        for label, row in rows.items():
            name = label.removesuffix("-spread")
            if label.endswith("-spread") and f"{name}-repeat" in rows:
                out.append((facet, int(p), name, row, rows[f"{name}-repeat"]))
    return out


def _time(row) -> str:
    iv = Interval(row.step_time_s, row.step_time_s_low, row.step_time_s_high, 0, float("nan"))
    return iv.format(".1f", 1e3)


def hsdp_lines(results) -> list[str]:
    """The section's lines (empty when the study has no spread/repeat pair)."""
    pairs = hsdp_pairs(results)
    if not pairs:
        return []
    analysis = results.analysis
    level = family_level(len(pairs))
    lines = ["| model | P | mesh | strategy | spread step (ms) | repeat step (ms) | "
             "spread / repeat (paired) | verdict | busiest NS GFLOP spread / repeat | "
             "replicate-axis MB sent, spread / repeat |", "|---|---|---|---|---|---|---|---|---|---|"]
    for facet, p, name, spread, repeat in pairs:
        cmp = None
        if analysis is not None and analysis.paired:
            rounds = analysis.rounds(facet, p)
            cmp = compare(spread.label, repeat.label, rounds.get(spread.label, {}),
                          rounds.get(repeat.label, {}), analysis.margin, level)
        facts = [results.facts.get(r.run, {}) for r in (spread, repeat)]
        mesh = facts[0].get("mesh", {}).get("shape")
        flops = " / ".join(f"{max(f.get('predicted_ns_flops_per_rank') or [0]) / 1e9:.2f}"
                           for f in facts)
        sent = " / ".join(f"{replicate_axis_bytes(f) / 1e6:.3f}" for f in facts)
        lines.append(f"| {facet} | {p} | {'x'.join(map(str, mesh)) if mesh else '–'} | {name} | "
                     f"{_time(spread)} | {_time(repeat)} | "
                     f"{cmp.ratio.format('.2f') if cmp else '–'} | "
                     f"{cmp.verdict if cmp else 'unpaired'} | {flops} | {sent} |")
    lines += ["", f"Each mode's step time: median and 95% interval of its timed steps. Ratio: the "
                  f"median of per-round ratios spread/repeat (below 1: spread is faster), interval "
                  f"at level {level:.4f} (95% over the {len(pairs)} rows together); verdict "
                  f"\"faster\" only when the interval ends below {1 - analysis.margin:.2f}. "
                  f"Replicate-axis bytes: what the busiest rank sends on a group that spans the "
                  f"replicate axis per optimizer step, from the plan (equal to the counted bytes "
                  f"per axis, tests/meshes/test_meshes_match_the_reference.py); FSDP2's own gradient all-reduce across "
                  f"replicas is not included."]
    return lines


def replicate_axis_bytes(facts: dict) -> float:
    """Bytes the busiest rank sends on an axis that includes the replicate axis (run.json facts)."""
    busiest = 0.0
    for rank in facts.get("planned_bytes_by_axis", []):
        busiest = max(busiest, sum(send for key, (send, _) in rank.items()
                                   if "replicate" in key.split("@", 1)[1]))
    return busiest
