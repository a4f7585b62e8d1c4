"""The interleaved study's statistics and its promise: medians with order-statistic intervals,
claims only with a margin, and every claim of a small study's report holding when it is rerun."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from dist_ortho.cli import main as cli_main
from dist_ortho.profiling import stats
from dist_ortho.reporting import comparison, report
from dist_ortho.studies.interleaved import foreign_cores, step_bound

ROOT = Path(__file__).resolve().parents[2]


# --- statistics (pure) ----------------------------------------------------------------------------

def test_order_statistic_interval_has_its_coverage():
    assert stats.binomial_coverage(6, 1) == pytest.approx(1 - 2 / 64)
    assert stats.binomial_coverage(9, 2) == pytest.approx(1 - 2 * 10 / 512)
    iv = stats.median_interval([5, 1, 4, 2, 3, 9, 8, 7, 6])  # n = 9: 2nd and 8th of the sorted
    assert (iv.median, iv.low, iv.high, iv.n) == (5, 2, 8, 9) and iv.coverage >= 0.95
    few = stats.median_interval([3, 1, 2])  # no 95% interval from 3 samples: [min, max], said so
    assert (few.low, few.high) == (1, 3) and few.coverage == pytest.approx(0.75)
    assert stats.median_interval([math.nan, math.inf]).n == 0
    with pytest.raises(ValueError, match="level"):
        stats.median_interval([1.0], level=1.5)


def test_claims_need_the_whole_interval_past_the_margin():
    rounds = range(9)
    slow = {r: 1.0 for r in rounds}
    clear = {r: 0.5 + 0.01 * r for r in rounds}  # ratio 0.50..0.58
    near = {r: 0.93 + 0.01 * r for r in rounds}  # ratio 0.93..1.01: inside the margin
    c = stats.compare("a", "b", clear, slow)
    assert c.verdict == "faster" and c.claim == ("a", "b") and "a faster than b" in c.sentence()
    assert stats.compare("b", "a", slow, clear).claim == ("a", "b")
    tie = stats.compare("a", "b", near, slow)
    assert tie.claim is None and "not distinguishable at this noise" in tie.sentence()
    # too few rounds for a 95% interval: no claim, however large the difference
    assert stats.compare("a", "b", {0: 0.1, 1: 0.1}, {0: 1.0, 1: 1.0}).claim is None
    assert stats.ordering({"a": 0.5, "b": 1.0, "c": 0.95},
                          [stats.compare("a", "c", clear, slow),
                           stats.compare("c", "b", near, slow)]) == "a < c ≈ b"
    assert stats.claim_holds(("a", "b"), {"a": clear, "b": slow})
    assert not stats.claim_holds(("a", "b"), {"a": slow, "b": clear})
    # unpaired: interval arithmetic, a claim only when the two intervals are apart by the margin
    a = stats.median_interval([0.5 + 0.01 * r for r in rounds])
    b = stats.median_interval([1.0 + 0.01 * r for r in rounds])
    assert stats.compare_unpaired("a", "b", a, b).verdict == "faster"
    assert stats.compare_unpaired("a", "b", b, b).verdict == "tie"


def test_many_pairs_at_once_need_a_wider_interval():
    assert stats.family_level(1) == stats.LEVEL == stats.family_level(0)
    assert stats.family_level(10) == pytest.approx(0.995)
    # 15 rounds: at 95% the 4th..12th ratios bound the median, at 99.5% the 2nd..14th
    ratios = [0.80, 0.86, 0.90, 0.91, 0.91, 0.92, 0.92, 0.92, 0.93, 0.93, 0.93, 0.93, 0.94,
              0.97, 1.02]
    a = {r: v for r, v in enumerate(ratios)}
    b = {r: 1.0 for r in a}
    assert stats.compare("a", "b", a, b).claim == ("a", "b")  # alone: 0.91..0.93 < 0.95
    assert stats.compare("a", "b", a, b, level=stats.family_level(10)).claim is None


def test_bound_of_a_step():
    # two matrices on two ranks: the spread (sum busy / P) beats the largest alone
    b = step_bound([1.0, 0.5], [1.2, 0.6], 2, bound_bytes=1e6, bandwidth=1e8)
    assert b["ns_bound_s"] == pytest.approx(1.0) and b["comm_bound_s"] == pytest.approx(0.01)
    assert b["bound_s"] == pytest.approx(1.01)
    # one matrix on four ranks: it cannot be split, the largest bounds the step
    b = step_bound([2.0], [3.0], 4, bound_bytes=0, bandwidth=None)
    assert b["ns_bound_s"] == 2.0 and b["bound_s"] == 2.0
    with pytest.raises(ValueError):
        step_bound([], [], 1, 0, None)
    assert foreign_cores(10.0, 20.0, 4.0, 3.0) == pytest.approx(2.0)
    assert foreign_cores(None, 20.0, 4.0, 3.0) is None


# --- rerun: every claim of the report holds in both runs ------------------------------------------

CLAIM = re.compile(r"^- (\S+) faster than (\S+): step time ratio")
GROUP = re.compile(r"^\*\*(.+), P = (\d+):\*\*")


def report_claims(md: str) -> dict[tuple[str, int], list[tuple[str, str]]]:
    """The claims the generated report.md states, per (model, world size)."""
    out: dict[tuple[str, int], list[tuple[str, str]]] = {}
    section = md.split("## Ranking", 1)[1].split("\n## ", 1)[0]
    key = None
    for line in section.splitlines():
        if m := GROUP.match(line):
            key = (m.group(1), int(m.group(2)))
            out[key] = []
        elif (m := CLAIM.match(line)) and key is not None:
            out[key].append((m.group(1), m.group(2)))
    return out


@pytest.mark.slow
def test_a_rerun_of_a_small_study_keeps_every_claim(tmp_path):
    """replicated orthogonalizes every matrix on both ranks at P = 2, balanced each once: twice
    the NS FLOPs per rank, a difference far past the margin, so the report claims it and a rerun
    (same seed, same machine) agrees; every other pair it states must hold as well."""
    study = {"name": "rerun", "base": str(ROOT / "launch" / "configs" / "base.yaml"),
             "output_dir": str(tmp_path / "out"), "point_timeout_s": 240,
             "set": {"train.log_every": 1000, "dist.timeout_s": 120},
             "schedule": {"mode": "interleaved", "repeats": 3, "steps": 3, "warmup_steps": 1,
                          "calibration_repeats": 1},
             "grid": {"strategies": ["replicated", "balanced"], "world_sizes": [2],
                      "models": [{"preset": "transformer-small",
                                  "set": {"model.num_layers": 1}}]}}
    path = tmp_path / "rerun.yaml"
    path.write_text(yaml.safe_dump(study))
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert cli_main(["study", str(path), "-o", str(out)]) == 0
        root = out / "rerun"
        md = (root / "report.md").read_text()
        results = report.load_results(root)
        stated = report_claims(md)
        assert stated == comparison.claims_of(results.analysis)  # the text is the analysis
        assert "load avg" in md and "threads per rank" in md  # beside the figures
        assert len(results.analysis.timings) == 2 * 9  # every timed step of both points
        runs.append((stated, results.analysis))
    assert any(pairs for stated, _ in runs for pairs in stated.values()), \
        "neither run claimed anything: the study cannot tell 2x the NS FLOPs apart"
    for stated, _ in runs:
        for _, other in runs:
            assert comparison.failed_claims(stated, other) == []
